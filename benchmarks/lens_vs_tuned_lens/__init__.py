"""Our tuned lens against AlignmentResearch's tuned-lens 0.2.0: same model, layer and training tokens.

    python -m benchmarks.lens_vs_tuned_lens --tokens 1000000 --data FILE [--layer 9 --out DIR]

Steps, in one run:
1. tuned-lens gets its own venv (default runs/venvs/tuned_lens; it is never installed into ours).
2. Ours runs end to end as `faithlens lens train` (teacher-cache build + Ray Train job) in a fresh cache
   folder, or with `--runner inprocess` as the same trainer in one process without Ray.
3. The sequences ours trained on are read back from its cache (its batch order replayed) and saved as a
   `datasets.Dataset` with an `input_ids` column.
4. tuned-lens trains on them in its venv through `_tuned_lens_child.py`: its `Train.execute` loop with its
   default optimizer (SGD, Nesterov momentum, lr_scale 1.0, linear decay), one translator at --layer.
5. Its translator is converted to our lens format and checked against tuned-lens's own forward; both lenses
   are evaluated by our code on the same held-out tokens; one table is printed and results.{json,md} written.

Both see the same sequences, each once: the token budget is rounded up so that tuned-lens's at most
`--tuned-lens-steps` (250, its default) steps take whole batches of `--batch-sequences` sequences (the batch of one
step of ours). BOS positions are trained by neither. Each tool's exact count is reported.

Modules: `config` (settings, the token plan, the run's folders), `train` (steps 1-4), `ours_inprocess` (ours
without Ray), `_tuned_lens_child` (runs in the peer venv), `evaluate` (step 5 and the table), `__main__` (the run).
"""
