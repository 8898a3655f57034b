"""The `blt` command line: run the pipeline or one stage, generate, picture patches, compare runs.

Every pipeline command takes ``--preset NAME|FILE`` (default ``tiny``), ``--set key.path=value``
(repeatable) and ``--workdir DIR``. Errors in configs or inputs print one clear line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _defaults_env() -> None:
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", "-p", "--config", "-c", dest="preset", default="tiny",
                   help="preset name in configs/ (tiny, small, blt-1b) or a YAML file (default: tiny)")
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set blt.train.max_steps=50 (repeatable)")
    p.add_argument("--workdir", "-w", default=None, help="root of stage outputs (default: from the preset)")


def _load(args):
    from blt_pipeline.config import load_config

    return load_config(args.preset, args.overrides, workdir=args.workdir)


def _print_result(result) -> None:
    print(json.dumps(result, indent=2, default=str))


def cmd_run(args) -> int:
    from flows.pipeline import format_summary, run_pipeline

    result = run_pipeline(_load(args))
    print(format_summary(result))
    return 0


def _stage_cmd(module: str, func: str):
    def run(args) -> int:
        import importlib

        cfg = _load(args)
        flow = getattr(importlib.import_module(module), func)
        _print_result(flow(cfg))
        return 0

    return run


def cmd_config(args) -> int:
    from blt_pipeline.config import dump_yaml

    print(dump_yaml(_load(args)), end="")
    return 0


def cmd_presets(args) -> int:
    from blt_pipeline.config import list_presets

    print("\n".join(list_presets()))
    return 0


def _delegate(module: str, func: str = "cli"):
    def run(args) -> int:
        import importlib

        return int(getattr(importlib.import_module(module), func)(args) or 0)

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    stages = [
        ("run", "run the whole pipeline: ingest -> train-entropy -> patch -> train -> eval", cmd_run),
        ("ingest", "ingest sources into Arrow doc shards", _stage_cmd("flows.ingest", "ingest_flow")),
        ("train-entropy", "pretrain the entropy model (runs ingest first if needed)",
         _stage_cmd("flows.train_entropy", "train_entropy_flow")),
        ("patch", "precompute entropies and patch boundaries", _stage_cmd("flows.patch", "patch_flow")),
        ("train", "train the BLT", _stage_cmd("flows.train_blt", "train_blt_flow")),
        ("eval", "evaluate the BLT (and the byte-level baseline)", _stage_cmd("flows.evaluate", "evaluate_flow")),
        ("config", "print the resolved configuration as YAML", cmd_config),
    ]
    for name, help_, fn in stages:
        p = sub.add_parser(name, help=help_, description=help_)
        _add_config_args(p)
        p.set_defaults(fn=fn)

    p = sub.add_parser("presets", help="list the presets in configs/")
    p.set_defaults(fn=cmd_presets)

    p = sub.add_parser("generate", help="generate bytes from a trained BLT")
    p.add_argument("--checkpoint", required=True, help="train_blt stage dir or model.pt")
    p.add_argument("--entropy-checkpoint", default=None,
                   help="train_entropy stage dir or model.pt (default: the one the BLT was trained with)")
    p.add_argument("--prompt", default="", help="prompt text (UTF-8)")
    p.add_argument("--prompt-file", default=None, help="read the prompt bytes from a file")
    p.add_argument("--max-bytes", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true", help="recompute the whole prefix for every byte")
    p.set_defaults(fn=_delegate("evaluation.generate"))

    p = sub.add_parser("show-patches", help="picture patch boundaries and entropies (HTML + PNG)")
    p.add_argument("--checkpoint", required=True, help="train_entropy stage dir, model.pt, or a train_blt dir")
    p.add_argument("--text", default=None)
    p.add_argument("--file", default=None)
    p.add_argument("--threshold", type=float, default=None, help="default: the patch stage's θ")
    p.add_argument("--out", default="patches", help="output path prefix (writes .html and .png)")
    p.set_defaults(fn=_delegate("evaluation.patch_viz"))

    p = sub.add_parser("compare", help="compare runs: val BPB against bytes seen (PNG + table)")
    p.add_argument("run_dirs", nargs="+", help="training stage dirs (or dirs containing them)")
    p.add_argument("--out", default="compare.png")
    p.set_defaults(fn=_delegate("evaluation.compare"))
    return parser


def main(argv: list[str] | None = None) -> int:
    _defaults_env()
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, PermissionError, ConnectionError, TimeoutError) as err:
        # ConfigError, IngestError, ShardCorruptError, ModelFileError, ... are ValueErrors whose message is
        # made for people.
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        from training.launch import TrainingFailed

        if isinstance(err, TrainingFailed):  # its message holds the training log's last lines
            print(f"error: {err}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
