"""Where the interpretation stage reads and writes inside a run directory.

A RUN is a folder holding a decoder (`RUN/decoder/decoder.json`, `RUN/distill/decoder/`, or the
decoder files directly) and an SAE (`RUN/sae/`, or the SAE recorded in decoder.json). Everything this
stage makes goes to `RUN/interpret/`, one file per step, so later steps (and the dashboard) read what
earlier ones wrote. The paths are the run-folder layout's (`training.layout`); this is its
interpretation-facing name.
"""

from __future__ import annotations

from training.layout import RunLayout

InterpretRun = RunLayout
