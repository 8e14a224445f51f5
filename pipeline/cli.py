"""`pipeline` command line: argument parsing and error reporting only; the stages do the work.

Exit codes: 0 success, 2 user error (one paragraph, no traceback), 1 internal error (traceback).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Callable, Sequence

from pipeline.errors import UserError

log = logging.getLogger("pipeline")
# Set once this process ran a vLLM engine or was a torchrun rank: see `entry`.
_SKIP_TEARDOWN = False


def _add_config_args(parser: argparse.ArgumentParser, required: bool = True,
                     help: str = "the run's JSON config file") -> None:
    parser.add_argument("--config", required=required, type=Path, help=help)
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one config value (JSON-typed, e.g. --set lora.r=8); repeatable",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline", description="Offline knowledge distillation: teacher top-k logit cache -> student."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("gen-logits", help="run the teacher(s) over the dataset and write the logit cache")
    _add_config_args(gen)
    gen.add_argument("--part", type=int, default=0, help="this process's part index I (0-based)")
    gen.add_argument("--num-parts", type=int, default=1, help="number of parts N the dataset is split into")
    gen.add_argument("--overwrite", action="store_true", help="delete an existing cache and start again")
    gen.set_defaults(run=_run_gen_logits)

    train = sub.add_parser("train-student", help="train the student (LoRA or full) from the logit cache")
    _add_config_args(train)
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    train.set_defaults(run=_run_train_student)

    merge = sub.add_parser("merge", help="fold a LoRA adapter into its base model and verify the result")
    merge.add_argument("--base", required=True, type=Path, help="the student base model directory")
    merge.add_argument("--adapter", required=True, type=Path, help="the adapter directory (train-student output)")
    merge.add_argument("--output", required=True, type=Path, help="where to write the merged model")
    merge.add_argument("--dtype", default="float32", choices=["bfloat16", "float16", "float32"])
    merge.set_defaults(run=_run_merge)

    inspect = sub.add_parser("inspect", help="summarize a logit cache; --verify checks every checksum")
    inspect.add_argument("cache_dir", type=Path)
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.add_argument("--verify", action="store_true", help="check every shard's sha256")
    inspect.add_argument(
        "--sample", type=int, default=256, metavar="N",
        help="decode the first N samples to report the teacher mass outside the top-k (0: skip)",
    )
    inspect.set_defaults(run=_run_inspect)

    evaluate = sub.add_parser("eval", help="score a student against a held-out teacher cache")
    evaluate.add_argument("--model", required=True, type=Path, help="base or merged student model directory")
    evaluate.add_argument("--adapter", type=Path, help="optional LoRA adapter directory on top of --model")
    evaluate.add_argument("--cache", required=True, type=Path, help="the held-out logit cache directory")
    evaluate.add_argument("--limit", type=int, help="score at most N samples")
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--json", action="store_true", help="machine-readable output")
    _add_config_args(evaluate, required=False, help=(
        "the JSON config the cache was made with (its dataset and models.teacher): needed only for a student "
        "whose tokenizer differs from the cache's, which is then scored on text (NLL per character)"))
    evaluate.set_defaults(run=_run_eval)
    return parser


def _load(args: argparse.Namespace):
    from pipeline.config import load_config

    return load_config(args.config, args.overrides)


def _run_gen_logits(args: argparse.Namespace) -> int:
    if args.num_parts < 1 or not 0 <= args.part < args.num_parts:
        raise UserError(f"--part {args.part} --num-parts {args.num_parts}: need 0 <= part < num-parts.")
    config = _load(args)  # config errors first, before the heavy imports
    from stages import gen_logits

    global _SKIP_TEARDOWN
    _SKIP_TEARDOWN = config.inference.engine == "vllm"
    gen_logits.run(config, part=args.part, num_parts=args.num_parts, overwrite=args.overwrite)
    return 0


def _run_train_student(args: argparse.Namespace) -> int:
    config = _load(args)
    from stages import train_student

    global _SKIP_TEARDOWN
    _SKIP_TEARDOWN = int(os.environ.get("WORLD_SIZE", "1")) > 1  # a torchrun / accelerate rank
    train_student.run(config, resume=args.resume)
    return 0


def _run_merge(args: argparse.Namespace) -> int:
    from stages import merge

    merge.run(args.base, args.adapter, args.output, dtype=args.dtype)
    return 0


def _run_inspect(args: argparse.Namespace) -> int:
    from stages import inspect_cache

    return inspect_cache.run(args.cache_dir, as_json=args.json, verify=args.verify, sample=args.sample)


def _run_eval(args: argparse.Namespace) -> int:
    config = _load(args) if args.config else None
    from stages import evaluate

    evaluate.run(
        args.model, args.cache, adapter=args.adapter, limit=args.limit, batch_size=args.batch_size,
        as_json=args.json, config=config,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception:  # an internal error: show everything a bug report needs
        traceback.print_exc()
        return 1


def entry(argv: Sequence[str] | None = None) -> None:
    """The `pipeline` command: main(), then its exit code. After a vLLM engine ran, or in a rank of a
    distributed training job, the process leaves with os._exit: by then the engine is shut down, the cache
    closed and committed, the student written and the process group destroyed, but native threads (vLLM's
    CPU build; gloo's workers) can still abort the interpreter's teardown ("terminate called without an
    active exception", exit -6), which would report a finished run as failed (measured: once in two
    `make demo` runs; once in a CI run of the two-rank FSDP2 test, rank 1 after the student was written)."""
    code = main(argv)
    if _SKIP_TEARDOWN:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
