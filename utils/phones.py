"""Phone labels with timings for the generated corpus, what a frame-level phone probe needs.

espeak-ng's library reports a phoneme event, with the sample it starts at, for every phone it
speaks (``espeakINITIALIZE_PHONEME_EVENTS``). The library is the one the ``espeak-ng`` command
that made the corpus links (found with ``ctypes.util``), so its samples are the command's: each
clip is spoken by both and the library's samples must equal the start of the command's output (which
adds a tail: silence, or a voice's echo dying away), and the command's output, resampled and trimmed as the corpus does it,
must equal the stored clip; otherwise the timings would describe other audio, and that is an error.
A phone spans from its event to the next one; times move to the 16 kHz clip by the resampling
ratio and the trimmed head, and are clipped to the clip.

Written per split as ``<split>/phones.jsonl``: one ``{"file_name": ..., "phones": [[phone, start_s,
end_s], ...]}`` per clip, in metadata order; phones are espeak-ng's mnemonics, pauses start with
``_``. Any corpus with such a file (a forced aligner's output on real speech, say) can be probed.
"""

from __future__ import annotations

import csv
import ctypes
import ctypes.util
import json
import multiprocessing
import os
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

from .corpus import speak, trimmed_clip
from .errors import MissingInput, UsageError
from .runs import atomic_open
from .text import SAMPLING_RATE

PHONES_FILE = "phones.jsonl"
PAUSE = "_"  # espeak-ng's pause phonemes start with it
_SYNCHRONOUS, _PHONEME_EVENTS, _POS_CHARACTER, _RATE, _PITCH = 2, 0x1, 1, 1, 3
_EVENT_END, _EVENT_PHONEME, _EVENT_LIST_TERMINATED = 5, 7, 0


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):  # espeak_EVENT of speak_lib.h
    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int), ("length", ctypes.c_int),
                ("audio_position", ctypes.c_int), ("sample", ctypes.c_int), ("user_data", ctypes.c_void_p), ("id", _EventId)]


_Callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


class _Library:
    """espeak-ng's library in synchronous mode with phoneme events. Its output depends on what it
    spoke before in the same process (measured: the second clip of a process differs from the
    command's), so each clip is spoken by a fresh process, as the command is (``library_speak``)."""

    def __init__(self):
        path = ctypes.util.find_library("espeak-ng")
        if path is None:
            raise MissingInput("espeak-ng's library (libespeak-ng) is not installed: run `make setup` (apt-get install espeak-ng)")
        self.lib = ctypes.CDLL(path)
        self.rate = self.lib.espeak_Initialize(_SYNCHRONOUS, 0, None, _PHONEME_EVENTS)
        if self.rate <= 0:
            raise MissingInput(f"espeak-ng's library ({path}) failed to start (code {self.rate})")
        self.chunks: list[np.ndarray] = []
        self.events: list[tuple[str, int]] = []
        self.callback = _Callback(self._collect)  # kept alive as long as the library may call it
        self.lib.espeak_SetSynthCallback(self.callback)

    def _collect(self, wav, count, events) -> int:
        if count > 0:
            self.chunks.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
        i = 0
        while events[i].type != _EVENT_LIST_TERMINATED:
            event = events[i]
            if event.type == _EVENT_PHONEME:
                self.events.append((event.id.string.decode("utf-8", "replace"), event.sample))
            elif event.type == _EVENT_END:
                self.events.append(("", event.sample))
            i += 1
        return 0

    def speak(self, text: str, voice: str, speed: int, pitch: int) -> tuple[np.ndarray, list[tuple[str, int]]]:
        """The samples (int16, at ``self.rate``) and the phoneme events (phone, first sample; ``""`` marks the end)."""
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise UsageError(f"espeak-ng has no voice {voice!r}: expected a voice of the generated corpus")
        self.lib.espeak_SetParameter(_RATE, speed, 0)
        self.lib.espeak_SetParameter(_PITCH, pitch, 0)
        data = text.encode("utf-8")
        self.lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, 0, None, None)
        self.lib.espeak_Synchronize()
        return (np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.int16)), self.events


def library_speak(text: str, voice: str, speed: int, pitch: int) -> tuple[int, np.ndarray, list[tuple[str, int]]]:
    """One clip from a fresh library (call it in a fresh process): sample rate, samples, phoneme events."""
    library = _Library()
    return (library.rate, *library.speak(text, voice, speed, pitch))


def clip_phones(text: str, voice: str, speed: int, pitch: int, stored: Path, spoken: tuple[int, np.ndarray, list[tuple[str, int]]]) -> list[list]:
    """``[phone, start_s, end_s]`` of one generated clip, in the stored clip's time, from what the
    library ``spoke`` of it; the clip must be the one espeak-ng makes of these settings (else one
    line naming it)."""
    library_rate, samples, events = spoken
    with tempfile.NamedTemporaryFile(suffix=".wav") as raw:
        speak(text, voice, speed, pitch, raw.name)
        command, rate = sf.read(raw.name, dtype="int16")
        audio, start = trimmed_clip(raw.name)
    if rate != library_rate or not np.array_equal(command[: len(samples)], samples):
        raise MissingInput(f"{stored}: espeak-ng's library and its command speak {text!r} differently: the phone timings would not fit the audio")
    kept, _ = sf.read(stored, dtype="int16")
    if not np.array_equal(_as_pcm16(audio), kept):
        raise UsageError(f"{stored} is not the clip espeak-ng makes of its metadata row ({voice}, speed {speed}, pitch {pitch}): "
                         "expected an unchanged generated corpus")
    scale, length = SAMPLING_RATE / rate, len(kept) / SAMPLING_RATE
    phones = []
    for (phone, first), (_, after) in zip(events, events[1:]):
        if not phone:
            continue
        begin, end = (min(max(s * scale - start, 0.0) / SAMPLING_RATE, length) for s in (first, after))
        if end > begin:
            phones.append([phone, round(begin, 6), round(end, 6)])
    return phones


def _as_pcm16(audio: np.ndarray) -> np.ndarray:
    """What writing ``audio`` as 16-bit PCM stores (soundfile's own conversion)."""
    import io

    buffer = io.BytesIO()
    sf.write(buffer, audio, SAMPLING_RATE, subtype="PCM_16", format="WAV")
    buffer.seek(0)
    return sf.read(buffer, dtype="int16")[0]


def add_phone_timings(split_dir: str | Path) -> Path:
    """``<split_dir>/phones.jsonl`` for a generated corpus split (made once, atomically)."""
    split_dir = Path(split_dir)
    target = split_dir / PHONES_FILE
    if target.is_file():
        return target
    metadata = split_dir / "metadata.csv"
    rows = list(csv.DictReader(open(metadata, newline="", encoding="utf-8"))) if metadata.is_file() else []
    if not rows or not {"voice", "speed", "pitch"} <= set(rows[0]):
        raise MissingInput(f"{split_dir} is not a generated corpus split (no voice, speed, pitch columns): phone timings must come with the data, "
                           f"as {PHONES_FILE} (one {{file_name, phones: [[phone, start_s, end_s], ...]}} per clip, from a forced aligner)")
    settings = [(row["transcription"], row["voice"], int(row["speed"]), int(row["pitch"])) for row in rows]
    # A fresh process per clip (forked: nothing to import again, and the library was never started here).
    with multiprocessing.get_context("fork").Pool(os.cpu_count() or 1, maxtasksperchild=1) as pool:
        spoken = pool.starmap(library_speak, settings, chunksize=1)
    with atomic_open(target) as f:
        for row, setting, said in zip(rows, settings, spoken):
            phones = clip_phones(*setting, split_dir / row["file_name"], said)
            f.write(json.dumps({"file_name": row["file_name"], "phones": phones}, ensure_ascii=False) + "\n")
    return target


def read_phone_timings(split_dir: str | Path) -> dict[str, list[list]]:
    """``file_name -> [[phone, start_s, end_s], ...]`` of a split; a split without them is one line saying what is needed."""
    path = Path(split_dir) / PHONES_FILE
    if not path.is_file():
        raise MissingInput(f"{path} does not exist: a frame-level phone probe needs phone labels with timings (the generated corpus makes them; "
                           "for real speech, e.g. FLEURS, give a --data_dir whose test split holds a forced aligner's phones.jsonl)")
    with open(path, encoding="utf-8") as f:
        return {row["file_name"]: row["phones"] for row in map(json.loads, f)}


def frame_labels(phones: list[list], frames: int, hop_seconds: float) -> list[str]:
    """The phone at the centre of each of a clip's ``frames`` output frames (``""`` outside every phone)."""
    labels = [""] * frames
    for phone, start, end in phones:
        first, last = int(np.ceil(start / hop_seconds - 0.5)), int(np.ceil(end / hop_seconds - 0.5))
        for t in range(max(first, 0), min(last, frames)):
            labels[t] = phone
    return labels
