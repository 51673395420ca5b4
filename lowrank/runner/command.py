"""``run.py``'s command line around the Hydra job (``lowrank.runner.app.run``).

``preflight(argv)`` runs before Hydra launches anything: it composes every job of the command line (the
sweep's cartesian product, and ``hydra.sweeper.params`` of presets) and checks each (``app.check``), so a
bad value in the 5th job of a sweep is reported before the 1st one trains; the jobs then do not check
their config again. ``task(cfg)`` is Hydra's task function: a
config error exits with one line and status 2; a failed run is recorded and the sweep goes on.
``main(hydra_main)`` is the entry point: exit status 2 on a config error, 1 if a run failed, else 0.
"""

from __future__ import annotations

import re
import sys

from omegaconf import DictConfig, OmegaConf

from lowrank.runner import app
from lowrank.runner.config import CONF_DIR, GROUPS, ConfigError, choices, first_line, writable

_failures: list[str] = []
_preflighted = False  # True once preflight has checked every job of this process's command line


def task(cfg: DictConfig) -> dict:
    """Hydra's task function (``run.py``): a config error exits with one line and status 2; a failed
    run is recorded in its result.json, counted, and the sweep goes on.

    A run directory another process holds, or task data that cannot be used, stop a single run with one
    line and status 2; in a sweep the job is reported in one line (running elsewhere: skipped; a data
    error: that job's failed result) and the other jobs go on."""
    from lowrank.runner.data import DataError
    from lowrank.runner.rundir import RunDirBusy

    try:
        result = app.run(cfg, checked=_preflighted)
    except (RunDirBusy, DataError) as e:
        if not _in_sweep():
            print(f"error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        if isinstance(e, RunDirBusy):
            print(f"skipped: {e}", file=sys.stderr, flush=True)
            return {"status": "running elsewhere", "error": str(e)}
        print(f"error: {e}", file=sys.stderr, flush=True)
        _failures.append(str(cfg.paths.output_dir))
        return {"status": "failed", "error": str(e)}
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    if result["status"] != "completed":
        _failures.append(str(cfg.paths.output_dir))
    return result


def _in_sweep() -> bool:
    """Whether this job is one of a Hydra multirun (``-m``)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:  # noqa: BLE001 - outside a Hydra app
        return False


def exit_status() -> int:
    """1 if any job of this process failed, else 0."""
    if _failures:
        print(f"error: {len(_failures)} run(s) failed; see result.json in: {', '.join(_failures)}", file=sys.stderr)
    return 1 if _failures else 0


_NO_PREFLIGHT = ("--help", "-h", "--hydra-help", "--version", "--cfg", "-c", "--info", "-i", "--shell-completion",
                 "-sc", "--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd",
                 "--experimental-rerun", "--resolve", "--package", "-p")


def jobs_of(argv: list[str]) -> list[list[str]]:
    """The override lists of the jobs ``run.py argv`` would launch (one list unless ``-m``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    multirun = "-m" in argv or "--multirun" in argv
    args = [a for a in argv if not a.startswith("-")]
    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides(args)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"cannot parse the overrides ({first_line(e)}); fix: write key=value, "
                          f"e.g. rank=8 or adapter=lora,dora with -m") from None
    for o in parsed:
        group = o.key_or_group
        if group not in GROUPS or o.is_delete():
            continue
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
        for value in values:
            if value not in choices(group) and value != "null":
                raise ConfigError(f"{group}={value!r} is unknown; fix: {group}=<one of {', '.join(choices(group))}>")
    if not multirun:
        return [args]
    # A preset's own sweep (hydra.sweeper.params) runs under the command line's overrides.
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        try:
            base = compose("config", overrides=[a for a, o in zip(args, parsed)
                                                if not o.is_sweep_override() and not a.startswith(_HYDRA)],
                           return_hydra_config=True)
        except Exception as e:  # noqa: BLE001
            raise _composition_error(e) from None
    preset = {k: str(v) for k, v in (OmegaConf.select(base, "hydra.sweeper.params") or {}).items()}
    given = {o.key_or_group for o in parsed}
    args = [f"{k}={v}" for k, v in preset.items() if k not in given] + args
    return sweep_product(parser.parse_overrides(args))


def sweep_product(overrides) -> list[list[str]]:
    """The jobs of a multirun: the cartesian product of the sweep overrides' values, in Hydra's basic
    sweeper's order (the first override varies slowest), each job a list of ``key=value`` strings."""
    import itertools

    lists = []
    for o in overrides:
        key = o.get_key_element()
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
        lists.append([f"{key}={v}" for v in values])
    return [list(job) for job in itertools.product(*lists)]


_HYDRA = ("hydra.", "hydra/", "+hydra", "++hydra", "~hydra")


def composed(jobs: list[list[str]]):
    """``(overrides, cfg)`` for each job: the config ``compose`` gives for its overrides (``hydra.*`` left
    out). Jobs that select the same config-group options share one composition (Hydra reads and merges the
    YAML files once, ~0.2 s); the other overrides are then set on a copy with ``OmegaConf.update``, as
    ``compose`` sets them after merging (``+key`` adds, ``++key`` adds or sets, ``~key`` deletes, ``key``
    sets a key that exists). Raises Hydra's composition errors, and ``ConfigError`` for an unknown key."""
    import copy

    from hydra import compose
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    by_groups: dict[tuple, DictConfig] = {}
    for overrides in jobs:
        overrides = [o for o in overrides if not o.startswith(_HYDRA)]
        parsed = parser.parse_overrides(overrides)
        groups = tuple(o.input_line for o in parsed if _selects_group(o))
        if groups not in by_groups:
            by_groups[groups] = compose("config", overrides=list(groups))
        cfg = copy.deepcopy(by_groups[groups])
        for o in parsed:
            if not _selects_group(o):
                _set(cfg, o)
        yield overrides, cfg


def _set(cfg: DictConfig, override) -> None:
    """Apply one value override to ``cfg`` the way Hydra's composition does."""
    key = override.key_or_group
    if override.is_delete():
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if node is None or leaf not in node:
            raise ConfigError(f"cannot delete '{key}': it is not in the config; fix: check its spelling")
        with writable(node):
            del node[leaf]
        return
    exists = OmegaConf.select(cfg, key, default=_MISSING, throw_on_missing=False) is not _MISSING
    if override.is_add() and exists:
        raise ConfigError(f"'+{key}' adds a key that exists; fix: write {key}=... (or ++{key}=...)")
    if not exists and not (override.is_add() or override.is_force_add()):
        raise ConfigError(f"unknown config key '{key}'; fix: check its spelling (`python run.py --cfg job` lists "
                          f"the keys)")
    value = override.value()
    with writable(cfg):
        OmegaConf.update(cfg, key, value, merge=isinstance(value, dict), force_add=True)


_MISSING = object()


def _composition_error(e: Exception) -> ConfigError:
    """Hydra's composition error (several lines) as one line with the fix."""
    unknown = re.match(r"Could not override '([^']+)'", first_line(e))
    if unknown:
        return ConfigError(f"unknown config key '{unknown.group(1)}'; fix: check its spelling "
                           f"(`python run.py --cfg job` lists the keys)")
    return ConfigError(f"{first_line(e)}; fix: check the override's key and value "
                       f"(`python run.py --help` lists groups and options)")


def _selects_group(override) -> bool:
    """Whether Hydra treats ``override`` as choosing a config-group option (conf/<group>/), which changes
    the defaults list, rather than as a value set after merging."""
    return not isinstance(override.value(), dict) and (CONF_DIR / override.key_or_group).is_dir()


def preflight(argv: list[str]) -> int:
    """Compose and check every job of the command line (``app.check``: values, names, files, and the
    targets/rank/options on the model's skeleton, once per distinct combination); raise ConfigError (one
    line) on the first bad one. Returns the number of jobs checked (0 when the command is not a run:
    --help, --cfg, ...); the jobs then run without checking their config again."""
    global _preflighted
    if any(a.split("=")[0] in _NO_PREFLIGHT for a in argv):
        return 0
    from hydra import initialize_config_dir

    jobs = jobs_of(argv)
    targets_checked: set[str] = set()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        configs = composed(jobs)
        for _ in jobs:
            try:
                _, cfg = next(configs)
            except ConfigError:
                raise
            except Exception as e:  # noqa: BLE001
                raise _composition_error(e) from None
            cfg.paths.output_dir = "<preflight>"  # Hydra resolves it inside the app only
            app.check(cfg, seen=targets_checked)
    _preflighted = True
    return len(jobs)


def main(hydra_main) -> None:
    """``run.py``: preflight, then Hydra; exits 2 on a config error, 1 if a run failed, else 0."""
    app.quiet_libraries()
    from lowrank.runner import distributed

    try:
        preflight(sys.argv[1:])
        sys.argv += distributed.torchrun_overrides(sys.argv[1:])
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    hydra_main()
    distributed.shutdown()
    raise SystemExit(exit_status())
