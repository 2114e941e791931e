"""The train command, `python -m utp_dist.train CONFIG.yaml [key=value ...]` (also `utp train`, and under accelerate launch
and torchrun, where every rank runs the same); the Python API, train(cfg), is utp_dist.api."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from dataclasses import dataclass

from utp_dist.api import train
from utp_dist.errors import UserError, one_line, run_command
from utp_dist.preemption import EXIT_RESUMABLE, Stopped
from utp_dist.store import handshake

# set by whoever gave this process its GPUs (an agent, a Slurm task with gpus_per_node): how many CUDA devices it must see
EXPECT_CUDA_ENV = "UTP_EXPECT_CUDA_DEVICES"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments: a config file, dotted overrides and the two inspection flags."""
    parser = argparse.ArgumentParser(prog="python -m utp_dist.train", description="Train an image classifier from a YAML config.")
    parser.add_argument("config", nargs="?", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides such as optim.lr=3e-4 train.eval_topk=[1,5]")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    parser.add_argument("--dry-run", action="store_true", help="validate, index the data, build the model, print a summary, exit")
    return parser.parse_intermixed_args(argv)  # flags may come before, between or after overrides


@dataclass(frozen=True)
class Outcome:
    """How a run ended: the exit code, the signal that stopped it (if one did) and the one-line error (if it failed)."""

    code: int
    stop_signal: int | None = None
    error: str | None = None


def main(argv: list[str] | None = None) -> int:
    """Run the command; user errors become one line on stderr and exit code 2."""
    from utp_dist import rank_failure

    code = run(argv).code
    rank_failure.exit_now(code)
    return code


def run(argv: list[str] | None = None) -> Outcome:
    """The command, returning its Outcome (the sweep launcher needs the stopping signal, not only the code)."""
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # torchvision 0.29 deprecates torchvision.io image decoding in favour of TorchCodec; it still works
    warnings.filterwarnings("ignore", message=".*image decoding and encoding.*")
    stopped: list[int | None] = []
    errors: list[str] = []
    handshake.begin(rank)  # whoever started this process may have asked where its run folder and outcome go

    def body() -> int:
        try:
            return _train(args)
        except Stopped as stop:
            print(f"utp_dist: {stop}; exit {EXIT_RESUMABLE} = stopped to be resumed", file=sys.stderr)
            stopped.append(stop.signum)
            return EXIT_RESUMABLE
        except UserError as err:
            errors.append(one_line(err))
            raise

    try:
        code = run_command(body, interrupted="interrupted; the newest complete training state (if any) continues the run")
    except Exception as err:  # a crash: the traceback goes to stderr as always, its last line to the handshake
        handshake.end(1, f"{type(err).__name__}: {one_line(err)}")
        raise
    error = errors[-1] if errors and code != 0 else None
    handshake.end(code, error)
    return Outcome(code, stopped[0] if stopped else None, error)


def check_expected_devices() -> None:
    """A job given N GPUs must not quietly train on the CPU: fail at start when fewer than $UTP_EXPECT_CUDA_DEVICES are visible."""
    wanted = os.environ.get(EXPECT_CUDA_ENV, "").strip()
    if not wanted or wanted == "0":
        return
    if not wanted.isdigit():
        raise UserError(f"{EXPECT_CUDA_ENV}={wanted!r}: must be a number of CUDA devices, e.g. 1")
    import torch

    seen = torch.cuda.device_count()
    if seen < int(wanted):
        build = f"torch {torch.__version__}" + ("" if torch.version.cuda else " (built without CUDA)")
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
        raise UserError(
            f"this job was given {wanted} GPU(s) but this process sees {seen} CUDA device(s) "
            f"(CUDA_VISIBLE_DEVICES={visible}, {build}); it would train on the CPU: check the driver and the torch build"
        )


def _train(args: argparse.Namespace) -> int:
    from utp_dist.config import load_config

    check_expected_devices()
    if args.config is None:
        raise UserError(
            "no config file given; run: python -m utp_dist.train CONFIG.yaml [section.key=value ...], e.g. configs/quickstart.yaml"
        )
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    if args.dry_run:
        from utp_dist.trainer import Components

        print(Components(cfg).describe())
        return 0
    summary = train(cfg)
    best, log = summary["best"], logging.getLogger("utp_dist")
    if "value" not in best:
        log.warning("done: no evaluation gave a finite %s, so no model was exported", best["metric"])
    else:
        log.info(
            "done: best %s = %.4f at epoch %d; model exported to %s",
            best["metric"],
            best["value"],
            best["epoch"] + 1,
            summary["paths"]["best_model"],
        )
    return 0
