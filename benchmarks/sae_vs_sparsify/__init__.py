"""Our TopK SAE against EleutherAI's sparsify: same model, layer, latents, k and training tokens.

    python -m benchmarks.sae_vs_sparsify --tokens 500000 --data FILE [--layer 9 --latents 5760 --k 64]

Steps, in one run:
1. sparsify gets its own venv (default runs/.venv-sparsify; it is never installed into ours).
2. The training sequences are made once with our corpus code (the train split of --data, exactly
   the sequences our activation cache holds), shuffled pass by pass and repeated as our trainer
   would cycle them, and saved as a `datasets.Dataset` with an `input_ids` column for sparsify.
3. sparsify trains in its venv through `_sparsify_child.py` (its `Trainer` called directly, fp32,
   the model cut at the hookpoint, 8 x 256-token batches, the BOS position excluded as ours does).
4. Ours runs end to end as `faithlens sae train` (cache build + Ray Train job), in a fresh cache
   folder so that its wall time includes the frozen forward.
5. sparsify's SAE is converted to our format and both are evaluated by `sae.metrics.evaluate_sae`
   on the same held-out tokens; one table is printed and results.{json,md} written to --out.

Both tools take the same number of optimizer steps (tokens // batch tokens). Ours trains on 256
positions per sequence minus BOS at 2,048 tokens per step; sparsify sees the same 8 x 256 batches
and skips the BOS position, so 2,040 trained tokens per step: each tool's exact count is reported.

Modules: `config` (the settings and the run's folders), `train` (steps 1-4), `evaluate` (step 5 and
the table), `__main__` (the run, in order).
"""
