"""``python -m lightning_optim.demo``: the one-minute tour (:mod:`lightning_optim.app.demo`)."""

if __name__ == "__main__":
    from lightning_optim.app.demo import main

    main()
