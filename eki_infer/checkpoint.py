"""Checkpoints of a run, written atomically after every iteration.

A checkpoint holds everything needed to continue a run exactly where it stopped: the
process states of all chains (ensembles or UKI Gaussians), the scheduler states (time t,
last Δt, done flags), the history so far, the evaluation counters, the initial ensemble
and the path, plus the chain groups already finished (sequential chains). Random keys
are not stored: iteration n of chain c always draws from ``fold_in(fold_in(rng_key, c),
n)``, so a resumed run with the same key takes the same steps and ends bit for bit where
an uninterrupted run would.

Writing is atomic: the state is pickled to a temporary file in the same folder, flushed
to disk, then renamed over the checkpoint, so a run killed at any moment leaves either
the previous checkpoint or the new one, never a torn file. A checkpoint also records a
fingerprint of the run (method, options, chains, key, model structure, data, and a
digest of what the model computes at fixed points: priors, noise, forward map) and
refuses to resume a different run. Its content carries a SHA-256 checksum, so a file
damaged on disk is refused rather than resumed from altered numbers.

Checkpoints are pickles: load only files you wrote (unpickling runs code).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
from pathlib import Path

import jax
import numpy as np

__all__ = ["Checkpoint", "CheckpointMismatchError"]

_FORMAT = 2


class CheckpointMismatchError(ValueError):
    """The checkpoint on disk was written by a different run, or cannot be read."""


class Checkpoint:
    """One run's checkpoint file.

    Args:
        path: the file (created with its parent folder if missing).
        fingerprint: a picklable description of the run; resuming compares it. A tuple
            of ``(name, value)`` pairs lets a mismatch name the parts that differ.
    """

    def __init__(self, path, fingerprint):
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.finished: list = []
        self.current: dict | None = None

    def load(self) -> bool:
        """Reads the file if it exists; returns whether there was anything to resume."""
        if not self.path.exists():
            return False
        content = self._read()
        if content["fingerprint"] != self.fingerprint:
            differ = _differing_parts(content["fingerprint"], self.fingerprint)
            if differ:
                what = f"it differs in its {'; '.join(differ)}"
            elif _named(self.fingerprint) and not _named(content["fingerprint"]):
                what = "an earlier version of eki_infer, whose fingerprints have another form"
            else:
                what = (
                    "method, options, number of chains, rng_key, data, or the model: its "
                    "structure, priors, noise or forward map differ"
                )
            raise CheckpointMismatchError(
                f"{self.path} was written by a different run ({what}); pass resume=False "
                "to start afresh, or another checkpoint path."
            )
        self.finished = content["finished"]
        self.current = content["current"]
        return True

    def _read(self) -> dict:
        """The file's content, after checking its format and checksum."""

        def unreadable(why):
            return CheckpointMismatchError(
                f"{self.path} is not a readable eki_infer checkpoint ({why}); delete it or "
                "pass resume=False to start afresh."
            )

        try:
            with open(self.path, "rb") as f:
                outer = pickle.load(f)
        except Exception as err:
            raise unreadable(f"truncated or corrupted: {type(err).__name__}: {err}") from None
        if not isinstance(outer, dict) or "format" not in outer:
            raise unreadable("no checkpoint header")
        if outer["format"] != _FORMAT:
            raise CheckpointMismatchError(
                f"{self.path} has checkpoint format {outer['format']}, expected {_FORMAT}."
            )
        payload = outer.get("payload")
        if not isinstance(payload, bytes) or hashlib.sha256(payload).hexdigest() != outer.get(
            "sha256"
        ):
            raise unreadable("its checksum does not match its content")
        try:
            content = pickle.loads(payload)
        except Exception as err:
            raise unreadable(f"{type(err).__name__}: {err}") from None
        if not isinstance(content, dict) or {"fingerprint", "finished", "current"} - set(content):
            raise unreadable("missing fields")
        return content

    def save_progress(self, group: int, loop_state: dict) -> None:
        """Records the running chain group's loop state and writes the file."""
        self.current = {"group": group, **jax.device_get(loop_state)}
        self._write()

    def save_finished(self, run) -> None:
        """Records a finished chain group (its whole result) and writes the file."""
        self.finished.append(jax.device_get(run))
        self.current = None
        self._write()

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = pickle.dumps(
            {"fingerprint": self.fingerprint, "finished": self.finished, "current": self.current},
            protocol=pickle.HIGHEST_PROTOCOL,
        )
        content = {
            "format": _FORMAT,
            "sha256": hashlib.sha256(payload).hexdigest(),
            "payload": payload,
        }
        fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                pickle.dump(content, f, protocol=pickle.HIGHEST_PROTOCOL)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


def _named(fingerprint) -> bool:
    """Whether a fingerprint is a tuple of ``(name, value)`` pairs (what the engine writes)."""
    return isinstance(fingerprint, tuple) and all(
        isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in fingerprint
    )


def _differing_parts(saved, current) -> list[str]:
    """The names of the parts two fingerprints differ in, where both are tuples of
    ``(name, value)`` pairs with the same names; else []."""
    if not (_named(saved) and _named(current)):
        return []
    if [n for n, _ in saved] != [n for n, _ in current]:
        return []
    return [n for (n, a), (_, b) in zip(saved, current, strict=True) if a != b]


def key_fingerprint(rng_key) -> tuple:
    """A picklable, comparable identity of a JAX PRNG key."""
    if jax.dtypes.issubdtype(getattr(rng_key, "dtype", None), jax.dtypes.prng_key):
        rng_key = jax.random.key_data(rng_key)
    return tuple(np.asarray(rng_key).ravel().tolist())
