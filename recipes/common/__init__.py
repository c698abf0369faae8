"""Pieces shared by the vision and NLP BiSSL recipes. Generic: nothing here knows the domain.

The stage layer (import from the submodules)
    :mod:`.pipeline` ``Recipe``: the stages (pretext, only-ft, head-warmup, bissl, finetune) over
    the hooks a recipe defines (data, models, losses, metrics, optimisers); :mod:`.cli` the one
    command line; :mod:`.settings` the shared config blocks (run, fine-tuning search, warm-up,
    BiSSL stage, sweep grids); :mod:`.bissl_stage` λ, the problem and the trainer
    (``run_bissl``); :mod:`.finetune` the one fine-tuning loop and evaluation (``fit``,
    ``evaluate``, ``Objective``); :mod:`.search` (lr, wd) search -> retrain over seeds ->
    aggregate (``fine_tune_method``, the result schema); :mod:`.report` ``results.json``, tables
    and plots; :mod:`.sweep` the Table 6.2 / F.6-F.8 sweeps; :mod:`.study` Only-FT vs BiSSL+FT
    over budgets; :mod:`.transfer_monitor` the transfer monitor (measures, trainer callback,
    correlations over a sweep); :mod:`.ij` the implicit-Jacobian settings.
Run-folder guards
    :mod:`.fingerprint` each stage's configuration record (``ConfigChanged``);
    :mod:`.run_lock` ``RunLock``, one command per ``run.out_dir`` (``filelock``);
    :mod:`.finite` ``NonFiniteStage``, ``check_loss``, ``check_weights``.

Runtime (:mod:`recipes.common.runtime`)
    ``seed_everything(seed, deterministic=False) -> torch.Generator``
    ``select_device(name="auto") -> torch.device``
    ``autocast(device, bf16) -> context manager`` (bf16 forward passes; a no-op when off)
    ``loader_kwargs(device, workers) -> dict`` (DataLoader workers / pinned memory)
    ``init_distributed(device_name, timeout=None) -> DistributedContext`` (``torchrun``: rank,
    device, reducer), ``per_rank_batch_size(batch, world, key)``, ``broadcast_module(module)``,
    ``shard_loader(dataset, batch, *, shuffle, seed, shard, ...)`` (a rank's share of the data),
    ``check_shard(shard) -> (rank, world)``
Configs (:mod:`recipes.common.config`, pydantic)
    ``config_block`` (a pydantic dataclass refusing unknown keys), the field types ``Float``,
    ``Int``, ``Bool``, ``Str`` and bounded lists; ``field(default, *, ge, gt, le, lt, choices,
    doc)`` for a plain dataclass config
    ``load_config(path, cls, overrides=()) -> cls`` YAML (``safe_load``) + ``key.sub=value``
    ``from_dict(cls, mapping)``, ``config_to_dict(cfg)``, ``parse_overrides(list)``
    ``ConfigError`` (names the offending key)
Hyperparameter search (:mod:`recipes.common.search`)
    ``log_uniform_grid(n, lr_range, wd_range, seed)``, ``grid_search(objective, lrs, wds, ...)``
    ``random_search(objective(lr, wd) -> metrics, n_trials, lr_range, wd_range, score_key=...)``
    ``retrain_over_seeds(run(seed) -> metrics, seeds)``, ``Trial``; each takes
    ``shard=(rank, world)`` to spread its runs round-robin over the ranks:
    ``map_over_ranks(fn, items, shard) -> [fn(x) for x in items]`` on every rank
Schedules (:mod:`recipes.common.schedules`)
    ``warmup_cosine(total_steps, warmup_steps, final_factor) -> step -> lr factor``
Reporting (:mod:`recipes.common.report`)
    ``aggregate(runs) -> {metric: {mean, std, n}}``, ``format_table(summary, metrics, scale=)``
    ``write_json(obj, path)`` (atomic), ``plot_bars(summary, metric, path)``,
    ``plot_curves({name: values}, path)`` (PNG, Agg backend)
Checkpoints (the library's :mod:`implicitbilevel.bissl.checkpoint`, re-exported here)
    ``save_checkpoint(obj, path)`` (temp file + ``os.replace``),
    ``load_checkpoint(path)`` (``weights_only=True``), ``CheckpointError``
"""

from implicitbilevel.bissl.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

from .config import ConfigError, config_to_dict, field, from_dict, load_config, parse_overrides
from .report import aggregate, format_table, plot_bars, plot_curves, write_json
from .runtime import (
    DEFAULT_PROCESS_GROUP_TIMEOUT,
    DistributedContext,
    autocast,
    broadcast_module,
    check_shard,
    init_distributed,
    loader_kwargs,
    per_rank_batch_size,
    seed_everything,
    select_device,
    shard_loader,
)
from .schedules import warmup_cosine
from .search import (
    RankFailure,
    Trial,
    grid_search,
    log_uniform_grid,
    map_over_ranks,
    random_search,
    retrain_over_seeds,
)

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DEFAULT_PROCESS_GROUP_TIMEOUT",
    "DistributedContext",
    "RankFailure",
    "Trial",
    "aggregate",
    "autocast",
    "broadcast_module",
    "check_shard",
    "config_to_dict",
    "field",
    "format_table",
    "grid_search",
    "from_dict",
    "init_distributed",
    "load_checkpoint",
    "load_config",
    "loader_kwargs",
    "log_uniform_grid",
    "map_over_ranks",
    "parse_overrides",
    "per_rank_batch_size",
    "plot_bars",
    "plot_curves",
    "random_search",
    "retrain_over_seeds",
    "save_checkpoint",
    "seed_everything",
    "select_device",
    "shard_loader",
    "warmup_cosine",
    "write_json",
]
