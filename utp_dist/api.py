"""The Python API: `train(cfg)` trains (or continues) a run in this process, the same code the train command runs."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from utp_dist.errors import UserError, worker_death
from utp_dist.preemption import Stopped

if TYPE_CHECKING:
    from utp_dist.config import Config


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
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return UserError(
            f"no space left on device writing {err.filename or cfg.output.root}; free some space and run the same command again"
        )
    return worker_death(err) or err
