"""Split a model's parameters into named optimizer param groups.

``param_groups(model)`` returns the list of dicts any ``torch.optim.Optimizer`` takes. Every
trainable parameter lands in exactly one group, frozen ones (``requires_grad=False``) in none.
Without rules the groups are, in this order (empty ones dropped):

- ``embedding``: the output (un)embedding, the V x H matrix whose rows the logits are taken
  against: ``coupled=True, weight_decay=0.0``. Found as (see :func:`find_unembedding`)
  1. tied: an ``nn.Embedding`` weight that a module other than an embedding also holds (the
     head of weight tying, Press & Wolf 2017), counted once; else
  2. untied: the ``nn.Linear`` whose ``out_features`` is the ``num_embeddings`` of an
     ``nn.Embedding`` of the model (the vocabulary) and that is named like a head (``lm_head``,
     ``head``, ``output``, ``decoder``, ``embed_out``, ``unembed``), else the model's last
     ``nn.Linear`` if its ``out_features`` is such a vocabulary size.
  A model with neither (a CNN, a classifier) has no such group; when coupling was asked for,
  the ``lightning_optim`` logger says so once per model.
- ``no_decay``: tensors with fewer than 2 dims (biases, norm scales) and the weights of every
  other embedding (position, token-type, an untied input embedding): ``weight_decay=0.0``.
- ``decay``: the rest, with ``weight_decay`` only when one is given (else the optimizer's).

Why. Decay on a bias or a normalization scale fights the normalization, which rescales the
activations anyway, so it only adds a pull towards zero that the loss must undo. Decoupled
decay shrinks every embedding row each step while a rare token's row only gets a gradient now
and then, so embeddings are not decayed (minGPT's and the original nanoGPT's
``configure_optimizers``, after GPT-2). ``coupled=True`` marks the group for ``CoupledAdam``,
which shares the second moment over the vocabulary rows. Stollenwerk & Stollenwerk (2025),
"Better Embeddings with Coupled Adam", arXiv:2502.08441: Sec. 1 sets the scene (the embedding
matrix maps tokens in, the unembedding maps the hidden state out to the vocabulary, and weight
tying makes them one matrix); the analysis before the experiments (Secs. 2-3) follows the
softmax gradient into the unembedding's rows, whose sum is zero and so cannot move their mean
under SGD, but whose per-row second moments make Adam move rare rows further, shifting the mean
(anisotropy). So the matrix to couple is the unembedding, and only it. The authors' code
(github.com/flxst/coupled-adam, nanoGPT/model.py ``configure_optimizers`` at commit ba54c74)
gives CoupledAdam exactly the parameter named ``*.wte.weight`` (nanoGPT's token embedding, tied
to ``lm_head``), with no weight decay; the position embedding ``wpe`` stays in the decayed
group of the other matrices, under AdamW. Here ``wpe`` goes to ``no_decay`` (as every embedding) and
is not coupled. Other optimizers warn once that they treat ``coupled`` as an ordinary option;
``create_optimizer(name, model)`` sets it only for CoupledAdam.

To couple something else (an untied input embedding too, or a head the rules above miss), give
a rule: ``rules=[{"match": "tok_emb.weight", "coupled": True, "weight_decay": 0.0}]``. Rules
come before the defaults and the first matching rule wins, like optax labels. A rule's group
gets exactly the options the rule gives: it does not inherit the ``embedding`` or ``no_decay``
defaults, so write ``weight_decay=0.0`` in a rule that takes biases if you want it.

Logging. The ``lightning_optim`` logger is set up as Lightning sets up ``lightning.pytorch``:
level INFO, and its records print on stderr (the message alone) unless logging is configured,
i.e. the logger or the root logger has a handler, in which case they go there. Unlike
Lightning, which decides once when it is imported, this is decided per record, so
``logging.basicConfig`` called later still takes over. Only global rank 0 logs.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import functools
import importlib
import logging
import os
import sys
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from lightning_optim.validation import LightningOptimWarning, at_least, boolean, invalid, suggest

__all__ = ["param_groups", "summarize", "find_unembedding"]

OWNER = "param_groups"
_RESERVED = ("params", "param_names", "name")
# Last names of an untied output head in common code: ours and nanoGPT (``head``/``lm_head``),
# Hugging Face (``lm_head``), Meta's Llama (``output``), Lightning's demo Transformer and
# torch's word_language_model (``decoder``), GPT-NeoX (``embed_out``), TransformerLens (``unembed``).
HEAD_NAMES = ("lm_head", "head", "output", "decoder", "embed_out", "unembed")
_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)


class _Console(logging.Handler):
    """Lightning's console setup for its own logger, decided per record rather than at import.

    ``lightning.pytorch`` sets its logger to INFO and, if the root logger has no handler when it
    is imported, adds a ``StreamHandler`` and stops propagation. This handler prints a record
    on stderr, the message alone as Lightning's info lines are, unless a handler other than
    this one would get it (on its logger or on an ancestor it propagates to): then logging is
    configured and the record goes there only. ``sys.stderr`` is looked up at each record so
    that a redirected stderr (pytest's ``capsys``, a notebook) gets it.
    """

    def emit(self, record: logging.LogRecord) -> None:
        logger: logging.Logger | None = logging.getLogger(record.name)
        while logger is not None:
            if any(h is not self for h in logger.handlers):
                return
            logger = logger.parent if logger.propagate else None
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:  # noqa: BLE001  logging must never raise into training
            self.handleError(record)


_logger = logging.getLogger("lightning_optim")
if _logger.level == logging.NOTSET:
    _logger.setLevel(logging.INFO)
if not any(type(h).__name__ == "_Console" for h in _logger.handlers):  # once, even across reloads
    _logger.addHandler(_Console())
_told: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # models already told they have no unembedding


def _rank() -> int:
    """The global rank, as Lightning's ``rank_zero_only`` finds it before any process group."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def _info(message: str) -> None:
    if _rank() == 0:
        _logger.info(message)


def param_groups(
    module: nn.Module,
    *,
    rules: Sequence[Mapping[str, Any]] | Mapping[Any, Mapping[str, Any]] = (),
    weight_decay: float | None = None,
    coupled: bool = True,
    log: bool = False,
) -> list[dict]:
    """Partition ``module``'s trainable parameters into named groups (see the module docstring).

    ``rules``: ``[{"match": "lm_head.*", "lr": 1e-4}, {"module": nn.LayerNorm, "weight_decay": 0.0}]``
    or the shorthand ``{"lm_head.*": {"lr": 1e-4}, nn.LayerNorm: {"weight_decay": 0.0}}``.
    ``match`` is a case-sensitive glob on the full parameter name; ``module`` is a class, its
    name (``"LayerNorm"``) or a dotted path, and matches parameters held directly by a module of
    that type. A tied tensor matches through any of its names and holders. ``group`` names the
    group (default: the pattern or the class name); rules naming the same group merge if their
    options are equal. Every other key is a group option, and the group gets only those: no
    ``embedding``/``no_decay`` defaults. The first matching rule wins; a rule that matches no
    trainable parameter raises, one that earlier rules fully shadow warns. Each group is
    ``{"name": ..., "params": [...], "param_names": [...], **options}``; ``param_names`` is what
    torch>=2.6 optimizers keep in their state_dict, so checkpoints name their tensors.

    ``coupled``: the ``embedding`` group's ``coupled`` option (the group holds the output
    embedding only, see :func:`find_unembedding`). ``log``: one summary line (:func:`summarize`)
    on the ``lightning_optim`` logger, printed like Lightning's own info lines.
    """
    if not isinstance(module, nn.Module):
        raise invalid(OWNER, "module", module, "must be a torch.nn.Module")
    coupled, log = boolean(OWNER, "coupled", coupled), boolean(OWNER, "log", log)
    if weight_decay is not None:
        weight_decay = at_least(OWNER, "weight_decay", weight_decay)

    named = list(module.named_parameters())  # a tied tensor once, under its first name
    trainable = [(n, p) for n, p in named if p.requires_grad]
    if not trainable:
        frozen = f" (all {len(named)} are frozen)" if named else ""
        raise invalid(OWNER, "module", type(module).__name__, f"has no trainable parameters{frozen}")
    aliases: dict[int, list[str]] = {}
    for n, p in module.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(n)
    owners: dict[int, list[nn.Module]] = {}
    for m in module.modules():
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), []).append(m)
    rules_ = _parse_rules(rules, module)
    hits = {n: [r for r in rules_ if r.matches(aliases[id(p)], owners[id(p)])] for n, p in named}

    options: dict[str, dict] = {}  # group name -> options, in output order
    for r in rules_:
        if options.setdefault(r.group, r.options) != r.options:
            raise invalid(OWNER, r.field, r.shown, f"group {r.group!r} already has options "
                          f"{options[r.group]!r}; rules sharing a group name must give equal options")
    unembedding = find_unembedding(module)
    embeddings = {id(m.weight) for m in module.modules() if isinstance(m, _EMBEDDINGS)}
    defaults = {"embedding": {"coupled": coupled, "weight_decay": 0.0}, "no_decay": {"weight_decay": 0.0},
                "decay": {} if weight_decay is None else {"weight_decay": weight_decay}}
    members: dict[str, list[tuple[str, Any]]] = {name: [] for name in [*options, *defaults]}
    for n, p in trainable:
        default = ("embedding" if id(p) in unembedding else
                   "no_decay" if p.dim() < 2 or id(p) in embeddings else "decay")
        members[hits[n][0].group if hits[n] else default].append((n, p))

    for r in rules_:
        if not any(r in hits[n] for n, _ in trainable):  # a typo must not silently train as default
            raise invalid(OWNER, r.field, r.shown, _no_match(r, hits, named, module))
        if not any(hits[n][0] is r for n, _ in trainable if hits[n]):
            warnings.warn(f"{OWNER}: {r.field}={r.shown!r} gets no parameter: earlier rules take all it "
                          "matches", LightningOptimWarning, stacklevel=2)
        flat = [n for n, p in trainable if hits[n] and hits[n][0] is r and p.dim() < 2]
        if r.options.get("coupled") and flat:  # the shared second moment averages over dim 0
            raise invalid(OWNER, r.field, r.shown, f"coupled groups must be 2-D or wider, but {flat[0]!r} "
                          f"has shape {tuple(dict(named)[flat[0]].shape)}")
    for name, opts in defaults.items():
        if members[name] and options.setdefault(name, opts) != opts:
            r = next(r for r in rules_ if r.group == name)
            raise invalid(OWNER, r.field, r.shown, f"group {name!r} is also a default group, whose options "
                          f"are {opts!r}; give equal options or another group name")

    groups = [{"name": name, "params": [p for _, p in members[name]],
               "param_names": [n for n, _ in members[name]], **opts}
              for name, opts in options.items() if members[name]]
    if coupled and not unembedding and module not in _told and not any(g.get("coupled") for g in groups):
        _told.add(module)  # once per model: the callback and the user may both partition it
        why = ("no nn.Embedding tied to a head, no head nn.Linear with a vocabulary of outputs"
               if any(isinstance(m, _EMBEDDINGS) for m in module.modules()) else "no nn.Embedding")
        _info(f"{OWNER}: {type(module).__name__} has no recognisable output embedding ({why}), "
              "so no tensor is coupled; couple one with a rule such as "
              "{'match': '<name>.weight', 'coupled': True, 'weight_decay': 0.0}")
    if log:
        _info(summarize(groups))
    return groups


def find_unembedding(module: nn.Module) -> dict[int, str]:
    """``{id(tensor): name}`` of the tensors that serve as ``module``'s output (un)embedding.

    1. Tied: each ``nn.Embedding`` weight that a module other than an embedding also holds
       (an output head sharing the tensor), under its first name. If any, that is the answer.
    2. Untied: among the ``nn.Linear`` modules whose ``out_features`` equals the
       ``num_embeddings`` of an embedding of the model (a vocabulary size), the last one named
       like a head (:data:`HEAD_NAMES`, the last part of its name), else the model's last
       ``nn.Linear`` if it is such a module. Requiring the vocabulary size keeps a classifier's
       head out; requiring the head name or the last place keeps out an MLP layer whose width
       happens to equal some embedding's size (a position table of 4 x d_model rows).

    Frozen tensors are never returned. An empty dict: no recognisable unembedding.
    """
    holders: dict[int, list[nn.Module]] = {}
    for m in module.modules():
        for p in m.parameters(recurse=False):
            holders.setdefault(id(p), []).append(m)
    names = {id(p): n for n, p in module.named_parameters() if p.requires_grad}
    embeddings = [m for m in module.modules() if isinstance(m, _EMBEDDINGS)]
    tied = {id(m.weight): names[id(m.weight)] for m in embeddings if id(m.weight) in names
            and any(not isinstance(h, _EMBEDDINGS) for h in holders[id(m.weight)])}
    if tied:
        return tied
    vocab = {m.num_embeddings for m in embeddings}
    linears = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    heads = [(n, m) for n, m in linears if m.out_features in vocab and id(m.weight) in names]
    named = [(n, m) for n, m in heads if n.rpartition(".")[2] in HEAD_NAMES]
    if named:
        return {id(named[-1][1].weight): names[id(named[-1][1].weight)]}
    if linears and heads and heads[-1][1] is linears[-1][1]:
        return {id(heads[-1][1].weight): names[id(heads[-1][1].weight)]}
    return {}


def summarize(groups: Sequence[Mapping[str, Any]]) -> str:
    """One line: each group's name, tensor count and parameter count in K/M/B."""
    parts = []
    for i, g in enumerate(groups):
        params = list(g["params"])
        plural = "tensor" if len(params) == 1 else "tensors"
        parts.append(f"{g.get('name', f'group{i}')} {len(params)} {plural} / "
                     f"{_human(sum(p.numel() for p in params))} params")
    return "param groups: " + ", ".join(parts)


def _human(n: int) -> str:
    if n < 1000:
        return str(n)
    for power, unit in ((1, "K"), (2, "M")):
        text = f"{n / 1000 ** power:.1f}"
        if float(text) < 1000:  # 999_950 reads 1.0M, not 1000.0K
            return text + unit
    return f"{n / 1e9:.1f}B"


@dataclasses.dataclass(frozen=True, eq=False)  # identity equality: options may hold tensors
class _Rule:
    field: str  # where the rule sits in ``rules``, for error messages
    shown: dict  # the rule as the user wrote it
    group: str
    options: dict
    pattern: str | None  # None for a module-type rule
    matches: Callable[[list[str], list[nn.Module]], bool]  # (a tensor's names, its holders)


def _parse_rules(rules: Any, module: nn.Module) -> list[_Rule]:
    """Normalize both rule forms, checking each rule before any parameter is looked at."""
    if isinstance(rules, Mapping):  # shorthand {glob or module type: options}
        items = [(f"rules[{k!r}]" if isinstance(k, str) else f"rules[{getattr(k, '__name__', k)}]", v,
                  {"match" if isinstance(k, str) else "module": k}) for k, v in rules.items()]
    elif isinstance(rules, Sequence) and not isinstance(rules, (str, bytes)):
        items = [(f"rules[{i}]", rule, {}) for i, rule in enumerate(rules)]
    else:
        raise invalid(OWNER, "rules", rules, "must be a list of mappings or a mapping {pattern: options}")

    parsed = []
    for field, shown, key in items:
        if not isinstance(shown, Mapping):
            example = "{'lr': 0.1}" if key else "{'match': 'head.*', 'lr': 0.1}"
            raise invalid(OWNER, field, shown, f"must be a mapping like {example}")
        if key and ("match" in shown or "module" in shown):
            raise invalid(OWNER, field, shown, "the key already says what to match; drop 'match'/'module'")
        rule = {**shown, **key}
        if ("match" in rule) == ("module" in rule):
            raise invalid(OWNER, field, shown, "needs exactly one of 'match' (a glob) or 'module' (a type)")
        opts = {k: v for k, v in rule.items() if k not in ("match", "module", "group")}
        for key in opts:
            if not isinstance(key, str) or key in _RESERVED:
                raise invalid(OWNER, f"{field}.{key}", opts[key], f"option names must be strings other "
                              f"than {', '.join(map(repr, _RESERVED))} (the partition sets those)")
        if "coupled" in opts:
            boolean(OWNER, f"{field}.coupled", opts["coupled"])
        if "match" in rule:
            pattern = rule["match"]
            if not isinstance(pattern, str) or not pattern:
                raise invalid(OWNER, f"{field}.match", pattern, "must be a non-empty glob string")
            default, matches = pattern, functools.partial(_glob, pattern)
        else:
            pattern, cls = None, _module_type(rule["module"], module, f"{field}.module")
            default, matches = cls.__name__, functools.partial(_instance, cls)
        name = rule.get("group", default)
        if not isinstance(name, str) or not name:
            raise invalid(OWNER, f"{field}.group", name, "must be a non-empty string")
        parsed.append(_Rule(field, shown, name, opts, pattern, matches))
    return parsed


def _module_type(spec: Any, module: nn.Module, field: str) -> type:
    """A class, its bare name (searched in the model, then ``torch.nn``) or a dotted path."""
    if isinstance(spec, type) and issubclass(spec, nn.Module):
        return spec
    if not isinstance(spec, str):
        raise invalid(OWNER, field, spec, "must be an nn.Module subclass or its name")
    in_model = {c.__name__: c for m in module.modules() for c in type(m).__mro__ if issubclass(c, nn.Module)}
    if "." in spec:
        path, _, attr = spec.rpartition(".")
        try:
            found = getattr(importlib.import_module(path), attr, None)
        except (ImportError, ValueError):
            found = None
    else:
        found = in_model.get(spec, getattr(nn, spec, None))
    if isinstance(found, type) and issubclass(found, nn.Module):
        return found
    known = dict.fromkeys([*in_model, *(n for n in dir(nn) if isinstance(getattr(nn, n), type))])
    hint = suggest(spec.rpartition(".")[2], known)
    raise invalid(OWNER, field, spec, f"is not a known nn.Module type{hint}")


def _no_match(rule: _Rule, hits: dict[str, list[_Rule]], named: list, module: nn.Module) -> str:
    frozen = [n for n, _ in named if rule in hits[n]]
    if frozen:  # a frozen tensor takes no optimizer option, so this is a mistake, not a no-op
        return f"matches only frozen parameters (requires_grad=False): {', '.join(map(repr, frozen))}"
    trainable = [n for n, p in named if p.requires_grad]
    if rule.pattern is not None:
        close = difflib.get_close_matches(rule.pattern, trainable, n=5, cutoff=0.5)
        if close:
            return f"matches no trainable parameter; did you mean {', '.join(map(repr, close))}?"
    elif any(rule.matches([], [m]) for m in module.modules()):
        return "matches no trainable parameter: those modules hold none directly; use a glob on names"
    more = f", ... ({len(trainable)} in all)" if len(trainable) > 10 else ""
    return f"matches no trainable parameter; trainable ones: {', '.join(map(repr, trainable[:10]))}{more}"


def _glob(pattern: str, names: list[str], owners: list[nn.Module]) -> bool:
    return any(fnmatch.fnmatchcase(n, pattern) for n in names)


def _instance(cls: type, names: list[str], owners: list[nn.Module]) -> bool:
    return any(isinstance(m, cls) for m in owners)
