"""Shards of a run (one per Slurm array task), the record of finished heatmaps that a rerun skips, and the merge.

Under OUTPUT_DIR/shards/, for shard i of n (`0003-of-0008`):
  progress-<i>-of-<n>.jsonl  one line per finished heatmap, appended once its PNGs are in place
  manifest-<i>-of-<n>.csv    the shard's manifest rows and their place in the input order, written when it ends
  errors-<i>-of-<n>.csv      the shard's failed items, written when it ends
  lock-<i>-of-<n>            locked while a run writes the shard; it names the run's process, host and start
`merge` joins the n shard manifests into vqa_manifest.csv (input order), boxes.jsonl (where boxes are made),
detections.jsonl (where a detector made the maps) and errors.csv, and the frames' overlays of each clip into an overlay clip (attention_map.clips). Shards never write the
same file, so array tasks can share one OUTPUT_DIR.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shlex
import socket
import time
from dataclasses import dataclass, fields
from pathlib import Path

from . import outputs
from .clips import write_clips
from .config import ConfigError, Settings
from .plan import part_job

log = logging.getLogger(__name__)

FOLDER = "shards"

# Settings that change which heatmaps are made or where, but not a heatmap's pixels. Every other key (and any key
# added later) is part of the fingerprint, so a rerun with other map settings redoes the heatmaps.
_NOT_IN_FINGERPRINT = {"RESULTS_ROOT", "DATA_FILE", "IMAGE_ROOT", "OUTPUT_DIR", "PROMPT_SOURCE", "STOP_AFTER",
                       "MAX_IMAGE_PIXELS", "FRAME_STRIDE", "MAX_FRAMES", "ALLOW_OUTSIDE_IMAGE_ROOT", "RESUME",
                       "OVERWRITE", "FAIL_FAST", "SHARD_INDEX", "SHARD_COUNT", "DEVICE", "BATCH_SIZE", "WORKERS",
                       "CONTAINER", "CONTAINER_IMAGE", "OFFLINE", "COMPILE"}


class IncompleteError(RuntimeError):
    """`merge` found shards that have not finished."""


def fingerprint(settings: Settings) -> str:
    """A short digest of the settings that shape a heatmap's pixels."""
    text = "\n".join(f"{f.name}={getattr(settings, f.name)}" for f in fields(settings)
                     if f.name not in _NOT_IN_FINGERPRINT)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    @property
    def tag(self) -> str:
        return f"{self.index:04d}-of-{self.count:04d}"

    def owns(self, film_number: int) -> bool:
        """Films are dealt round-robin in first-seen order: stable, balanced, and all prompts of a film together."""
        return film_number % self.count == self.index

    def path(self, output_dir: Path, kind: str) -> Path:
        suffix = {"progress": ".jsonl", "lock": ""}.get(kind, ".csv")
        return output_dir / FOLDER / f"{kind}-{self.tag}{suffix}"


@contextlib.contextmanager
def held(output_dir: Path, shard: Shard):
    """Hold this shard of OUTPUT_DIR for the block: a second run writing it at once (the same job submitted twice,
    two configs with one OUTPUT_DIR) would replace the progress file that this one appends to, and mix its
    heatmaps with this one's. An flock, so a killed run lets go; on a file system without locks, a warning."""
    path = shard.path(output_dir, "lock")
    path.parent.mkdir(exist_ok=True)
    with open(path, "a+") as handle:
        try:
            _lock(handle, output_dir, shard)
        except OSError as error:      # some NFS and Lustre mounts have no locks
            log.warning("%s cannot be locked (%s): two runs writing this shard at once would spoil it", path,
                        error.strerror)
            yield
            return
        handle.truncate(0)
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        try:
            yield
        finally:
            handle.truncate(0)        # it names a run only while the run holds it (a killed run's stays)


def check_free(output_dir: Path, shard: Shard) -> None:
    """Raise ConfigError now, before the model loads, where another run holds this shard (held() takes it only
    when the run starts writing). Writes nothing."""
    path = shard.path(output_dir, "lock")
    if path.is_file():
        with open(path) as handle, contextlib.suppress(OSError):   # no locks: held() will say so
            _lock(handle, output_dir, shard)                          # let go as the file closes


def _lock(handle, output_dir: Path, shard: Shard) -> None:
    """flock the open lock file `handle`; ConfigError naming the holder where another run has it."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        raise ConfigError([f"{output_dir}: shard {shard.tag} is being written by another run "
                           f"({handle.read().strip() or 'its process unknown'}): wait for it to end, or give this "
                           f"run another OUTPUT_DIR"]) from None


def recorded_shard_count(output_dir: Path) -> int | None:
    """SHARD_COUNT of the run that OUTPUT_DIR holds, from its run_config.conf."""
    value = read_run_config(output_dir).get("SHARD_COUNT", "")
    return int(value) if value.isdigit() else None


def read_run_config(output_dir: Path) -> dict[str, str]:
    """KEY -> value of OUTPUT_DIR/run_config.conf ({} where there is none); DamagedFileError naming the line where
    it is not what a run writes (an edit, a disk's error)."""
    path = output_dir / outputs.RUN_CONFIG
    if not path.is_file():
        return {}
    try:
        return _conf_values(path.read_text())
    except ValueError as error:     # not UTF-8, a quote left open
        raise outputs.DamagedFileError(f"{path}: {error}: the file is damaged; delete it (a run writes it anew; give "
                                       f"an array's resubmitted task SHARD_COUNT)") from None


def _conf_values(text: str) -> dict[str, str]:
    """KEY -> value of a text that Settings.to_conf wrote."""
    values = {}
    for number, line in enumerate(text.splitlines(), 1):
        name, sep, value = line.partition("=")
        if sep:
            try:
                parts = shlex.split(value)
            except ValueError as error:
                raise ValueError(f"line {number}: {error}") from None
            values[name] = parts[0] if parts else ""
    return values


def changed_settings(output_dir: Path, settings: Settings) -> list[str]:
    """'KEY was A, now B' for each setting of the fingerprint that OUTPUT_DIR/run_config.conf, the last run's, records
    otherwise: why that run's heatmaps are made again (a model folder written another way is one reason)."""
    try:
        before = read_run_config(output_dir)
    except outputs.DamagedFileError:    # the reasons are a courtesy; this run writes the file anew
        return []
    now = _conf_values(settings.to_conf())
    return [f"{name} was {before[name] or '(empty)'}, now {now[name] or '(empty)'}" for name in now
            if name not in _NOT_IN_FINGERPRINT and name in before and before[name] != now[name]]


def resolve_shard(settings: Settings, environ: dict[str, str]) -> Shard:
    """This task's shard. Unset keys come from the Slurm array: SHARD_INDEX = SLURM_ARRAY_TASK_ID and
    SHARD_COUNT = the count recorded in OUTPUT_DIR by an earlier task of the run (so resubmitting `--array=3`
    keeps the split of `--array=0-7`), else SLURM_ARRAY_TASK_MAX + 1. Outside an array: shard 0 of 1."""
    task = environ.get("SLURM_ARRAY_TASK_ID", "")
    in_array = task.isdigit()
    index = settings.SHARD_INDEX if settings.SHARD_INDEX is not None else int(task) if in_array else 0
    count, where = settings.SHARD_COUNT, "SHARD_COUNT"
    if count is None and in_array:
        count, where = recorded_shard_count(settings.OUTPUT_DIR), f"SHARD_COUNT in {settings.OUTPUT_DIR / outputs.RUN_CONFIG}"
        if count is None:
            count, where = int(environ.get("SLURM_ARRAY_TASK_MAX", task)) + 1, "the Slurm array (SLURM_ARRAY_TASK_MAX + 1)"
    count = count or 1
    if index >= count:
        raise ConfigError([f"SHARD_INDEX={index} is not below {count} from {where}: array indices run from 0 to "
                           f"SHARD_COUNT-1 (set SHARD_COUNT to split the run differently)"])
    return Shard(index, count)


class Progress:
    """The finished heatmaps of OUTPUT_DIR: read from every shard's progress file, appended to this shard's.

    A heatmap counts as finished when a progress line names it with the same prompt and settings fingerprint and
    its PNGs are complete on disk; anything else is made again.
    """

    def __init__(self, output_dir: Path, shard: Shard, settings_fingerprint: str, read_existing: bool):
        self.output_dir = output_dir
        self.path = shard.path(output_dir, "progress")
        self.fingerprint = settings_fingerprint
        self.entries: dict[str, dict] = {}
        self.other_settings = 0   # finished heatmaps made with other settings (they are redone)
        self._handle = None
        self.parts: dict[str, dict[int, dict]] = {}   # a planned job's overlay -> its parts' entries by part
        if read_existing:
            for journal in sorted((output_dir / FOLDER).glob("progress-*.jsonl")):
                for entry in _read_journal(journal):
                    self._keep(entry)

    def _keep(self, entry: dict) -> None:
        self.entries[entry["overlay"]] = entry
        if entry.get("parent"):
            self.parts.setdefault(entry["parent"], {})[entry["part"]] = entry

    def finished(self, job) -> list[tuple] | None:
        """(job, progress entry) of each map `job` (a plan.Job) made, when all are done with these settings and all
        their files are whole: the job itself, or where it made several maps (a detector's detections) each of
        them, as the plan.Job of that part."""
        entry = self.entries.get(job.overlay)
        if entry is not None:
            done = [(job, entry)]
        else:
            parts = self.parts.get(job.overlay, {})
            if not parts or len(parts) != next(iter(parts.values())).get("parts"):
                return None
            done = [(part_job(job, number, e["parts"], e["target"]), e) for number, e in sorted(parts.items())]
        if any(e.get("prompt") != job.prompt.text for _, e in done):
            return None
        if any(e.get("settings") != self.fingerprint for _, e in done):
            self.other_settings += 1
            return None
        if not all(outputs.png_is_complete(self.output_dir / name) for made, _ in done for name in made.files):
            return None
        return done

    def open(self) -> None:
        """Start appending to this shard's file, keeping its whole lines (a kill may have cut the last one)."""
        kept = _read_journal(self.path) if self.path.exists() else []
        outputs.write_atomic(self.path, b"".join(_line(e) for e in kept))
        self._handle = open(self.path, "ab")

    def add(self, job, made) -> None:
        """`job`: a plan.Job, whose files are written; `made`: its plan.Made (method, target, score, warning, boxes),
        kept so that a resumed run's manifest row is the same as an uninterrupted run's."""
        entry = dict(overlay=job.overlay, prompt=job.prompt.text, warning=made.warning, raw_map=job.raw_map,
                     frame=job.frame, method=made.method, target=made.target, score=made.score, boxes=made.boxes,
                     settings=self.fingerprint)
        if job.parent:
            entry |= dict(parent=job.parent, part=job.part, parts=job.parts)
        if made.detections is not None:
            entry["detections"] = made.detections
        entry |= {name: value for name in ("answer", "p_yes", "similarity")
                  if (value := getattr(made, name)) is not None and value == value}
        self._keep(entry)
        self._handle.write(_line(entry))
        self._handle.flush()

    def close(self, overlays_in_order: list[str]) -> None:
        """Rewrite this shard's file with one line per finished heatmap, in input order (given as the planned jobs'
        overlays; a job's parts in their order)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        entries = [entry for o in overlays_in_order for entry in
                   ([self.entries[o]] if o in self.entries else [e for _, e in sorted(self.parts.get(o, {}).items())])]
        outputs.write_atomic(self.path, b"".join(_line(e) for e in entries))


def _line(entry: dict) -> bytes:
    return (json.dumps(entry, ensure_ascii=False, sort_keys=True) + "\n").encode()


def _read_journal(path: Path) -> list[dict]:
    entries = []
    for raw in path.read_bytes().split(b"\n"):
        try:
            entry = json.loads(raw)
        except ValueError:   # the empty tail, or a line cut by a kill
            continue
        if isinstance(entry, dict) and isinstance(entry.get("overlay"), str):
            entries.append(entry)
    return entries


def write_shard(output_dir: Path, shard: Shard, rows: dict[tuple[int, int], outputs.ManifestRow],
                errors: list) -> None:
    """The shard's manifest (with each row's place in the input order, `job.part`) and its errors, written when it
    ends."""
    header = ["order"] + outputs.MANIFEST_COLUMNS
    body = [[f"{i}.{part}" if part else str(i)] + [getattr(rows[i, part], c) for c in outputs.MANIFEST_COLUMNS]
            for i, part in sorted(rows)]
    outputs.write_atomic(shard.path(output_dir, "errors"), outputs.errors_bytes(errors))
    outputs.write_atomic(shard.path(output_dir, "manifest"), outputs.csv_bytes(header, body))


@dataclass
class Merged:
    shards: int
    heatmaps: int
    errors: list[tuple[str, str, str, str]]


def merge(output_dir: Path, count: int | None = None) -> Merged:
    """Join the manifests of all shards into vqa_manifest.csv and their errors into errors.csv.

    Raises IncompleteError naming the shards that have not finished; nothing is written then.
    """
    output_dir = Path(output_dir)
    count = count or recorded_shard_count(output_dir)
    if count is None:
        raise IncompleteError(f"{output_dir}: no {outputs.RUN_CONFIG}; is this the OUTPUT_DIR of a run?")
    shards = [Shard(i, count) for i in range(count)]
    missing = [s.index for s in shards if not s.path(output_dir, "manifest").is_file()]
    if missing:
        listed = ",".join(map(str, missing))
        raise IncompleteError(f"{output_dir}: {len(missing)} of {count} shards have not finished ({listed}); "
                              f"resubmit them, e.g. `sbatch --array={listed} submit_heatmap_gen.sh CONF`, then merge")
    rows, errors = [], []
    for shard in shards:
        try:
            rows.extend(outputs.read_csv(shard.path(output_dir, "manifest")))
            errors.extend(tuple(e.values()) for e in outputs.read_csv(shard.path(output_dir, "errors")))
        except outputs.DamagedFileError as error:   # the shard's run, again, writes both from its progress
            raise IncompleteError(f"{error}; run shard {shard.index} again (e.g. `sbatch --array={shard.index} "
                                  f"submit_heatmap_gen.sh CONF`; what it finished is kept), then merge") from None
    rows.sort(key=lambda row: tuple(map(int, row["order"].split("."))))
    errors.sort(key=lambda e: (int(e[0]) if e[0].isdigit() else 0, e[1], e[2]))
    outputs.write_atomic(output_dir / outputs.MANIFEST,
                         outputs.csv_bytes(outputs.MANIFEST_COLUMNS,
                                           [[row.get(c, "") for c in outputs.MANIFEST_COLUMNS] for row in rows]))
    root = read_run_config(output_dir).get("IMAGE_ROOT")
    clips = write_clips(output_dir, rows, Path(root) if root else None)
    if clips:
        log.info("wrote %d overlay clips (e.g. %s)", len(clips), clips[0])
    boxes = b"".join(outputs.boxes_line(row) for row in rows if row.get("boxes"))
    for name, text in ((outputs.BOXES, boxes), (outputs.DETECTIONS, outputs.detections_lines(rows))):
        if text:
            outputs.write_atomic(output_dir / name, text)
        else:
            (output_dir / name).unlink(missing_ok=True)
    if errors:
        outputs.write_atomic(output_dir / outputs.ERRORS, outputs.errors_bytes(errors))
    else:
        (output_dir / outputs.ERRORS).unlink(missing_ok=True)
    outputs.remove_temporaries(output_dir)
    return Merged(count, len(rows), errors)
