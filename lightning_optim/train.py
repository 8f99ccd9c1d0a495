"""``python -m lightning_optim.train [overrides]``: the main job's command line.

The app itself lives in :mod:`lightning_optim.app.train`; this module only keeps the command.
"""

if __name__ == "__main__":
    # Run under the import name, so that main() and the CheckConfig Hydra instantiates by name
    # (lightning_optim.app.train.CheckConfig) share one module, and with it CheckConfig.started.
    from lightning_optim.app.train import main

    main()
