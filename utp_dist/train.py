"""Train one run: `python -m utp_dist.train CONFIG.yaml [key=value ...]`, or `train(cfg)` from Python (both also under
accelerate launch and torchrun, where every rank runs the same)."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import types
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

from utp_dist.errors import UserError, one_line, run_command
from utp_dist.preemption import EXIT_RESUMABLE, Stopped
from utp_dist.store import handshake

if TYPE_CHECKING:
    from utp_dist.config import Config

# set by whoever gave this process its GPUs (an agent, a Slurm task with gpus_per_node): how many CUDA devices it must see
EXPECT_CUDA_ENV = "UTP_EXPECT_CUDA_DEVICES"


def train(cfg: Config) -> dict:
    """Train (or continue) the run of `cfg` in this process and return its summary (what summary.json holds).

    Errors the user can fix raise UserError (ConfigError, DataError, ...); a stop signal raises Stopped once the
    training state is saved, and the same call continues the run.
    """
    from utp_dist import rank_failure
    from utp_dist.config import Config, from_dict
    from utp_dist.trainer import Trainer, reset_accelerate

    if not isinstance(cfg, Config):
        raise TypeError(f"train() takes a Config, got {type(cfg).__name__}; build one with Config(...) or Config.from_yaml(path)")
    cfg = from_dict(cfg.to_dict(), "config")  # validated again: fields assigned after construction are checked too
    reset_accelerate()  # Accelerate's process-wide state belongs to an earlier run in this process, if any
    try:
        return Trainer(cfg).fit()
    except Stopped:
        raise  # every rank stops at the same agreed step
    except Exception as err:
        rank_failure.fail()  # the other ranks may be waiting for this one in a collective: end them first
        raise _one_line(err, cfg) from None
    finally:
        rank_failure.unwatch()


def _one_line(err: Exception, cfg: Config) -> Exception:
    """The UserError for a dead DataLoader worker or a full disk (anywhere but a state or an export, which say more)."""
    from utp_dist.data.loaders import worker_death

    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return UserError(
            f"no space left on device writing {err.filename or cfg.output.root}; free some space and run the same command again"
        )
    return worker_death(err) or err


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
    """How a run ended: the exit code and, when a signal stopped it, which one."""

    code: int
    stop_signal: int | None = None


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
    handshake.end(code, errors[-1] if errors and code != 0 else None)
    return Outcome(code, stopped[0] if stopped else None)


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
    from utp_dist.trainer import Trainer

    if args.dry_run:
        print(Trainer(cfg, dry_run=True).describe())
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


class _TrainModule(types.ModuleType):
    """`from utp_dist import train` finds this module (Python sets a package's attribute to its submodule on import,
    which would shadow a function of the same name), so the module itself is callable: train(cfg)."""

    def __call__(self, cfg: Config) -> dict:
        """Train the run of `cfg`; see train()."""
        return train(cfg)


sys.modules[__name__].__class__ = _TrainModule

if __name__ == "__main__":
    sys.exit(main())
