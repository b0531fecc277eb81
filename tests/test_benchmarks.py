import json

import pytest

from benchmarks.__main__ import main
from models.errors import ConfigError


def test_benchmark_command_runs_on_a_tiny_model(tiny_model_dir, capsys):
    main(["--model", str(tiny_model_dir), "--dtype", "fp32", "--layer", "2", "--batch", "2", "--seq-len", "32",
          "--repeats", "1", "--cache-tokens", "256", "--sae-tokens", "2048", "--latents", "64", "--k", "4", "--distill-steps", "1",
          "--distill-depths", "1,2",
          "--ppo-iterations", "1", "--ppo-batch", "64", "--interpret-tokens", "256", "--label-features", "4",
          "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    f = result["foundation"]
    assert f["full_forward_tok_s"] > 0 and f["activations_only_L2_tok_s"] > 0 and f["cache_build_tok_s"] > 0
    assert "model_load_cold_s" not in f  # only the embedded GGUF model has a cold load
    s = result["sae"]
    assert s["topk_train_tok_s"] > 0 and s["relu_end_to_end_tok_s"] > 0 and s["peak_rss_mb"] > 0
    d = result["distill"]
    for student in ("linear", "readout", "context1", "context2", "lens"):
        for teacher in ("cache", "online"):
            key = f"{student}_{teacher}"
            assert d[f"{key}_tok_s"] > 0 and d[f"{key}_peak_rss_mb"] > 0 and d[f"{key}_trainable_params"] > 0
    assert d["context2_cache_trainable_params"] > d["context1_cache_trainable_params"] and d["cache_build_tok_s"] > 0
    r = result["rl"]
    for kind in ("token", "generation"):
        assert r[f"{kind}_env_steps_per_s_batched"] > 0 and r[f"{kind}_env_steps_per_s_one_at_a_time"] > 0
    assert r["ppo_iteration_s"] > 0 and r["peak_rss_mb"] > 0
    i = result["interpret"]
    for key in ("attribution_decoder_predictions_s", "attribution_with_spliced_predictions_s", "evidence_scan_tok_s",
                "label_stats_features_s", "label_local_features_s", "judge_local_contexts_s",
                "judge_local_shared_pairs_s", "peak_rss_mb"):
        assert i[key] > 0, key


def test_delphi_check_scores_the_held_out_contexts_of_features_score_and_ranks_with_spearman(tmp_path):
    import random

    from benchmarks.check_delphi import DelphiCheckConfig, chosen_contexts, spearman
    from interpret.label_config import LabelConfig
    from interpret.labels import run_label
    from interpret.scoring import held_out_contexts
    from tests.test_labels import write_evidence
    from tests.test_scoring import WordLabeler, word_feature

    run = write_evidence(tmp_path, [word_feature(1, "cat"), word_feature(2, "dog", dense=True), word_feature(3, "owl")])
    run_label(LabelConfig(run=tmp_path, backend="local", top=3), labeler=WordLabeler({1: "cat", 2: "dog", 3: "owl"}))
    chosen = chosen_contexts(DelphiCheckConfig(run=tmp_path, n_examples=5, shown=5))
    assert sorted(f["id"] for f in chosen) == [1, 3]  # the dense feature is left out: delphi's negatives must not fire
    for f in chosen:
        assert f["label"] in ("cat", "owl") and len(f["active"]) == len(f["negatives"]) == 5
        assert all(max(ex["acts"]) == 0 for ex in f["negatives"]) and all(max(ex["acts"]) > 0 for ex in f["active"])
    from interpret.evidence import load_evidence
    from interpret.labels import examples_shown, load_label_records

    ev, rec = load_evidence(run)[1], load_label_records(run)[1]["local"]
    same = held_out_contexts(ev, examples_shown(rec, ev), 5, 0, random.Random("0-1"))
    first = next(f for f in chosen if f["id"] == 1)
    assert [ex.tokens for ex in same.active] == [ex["tokens"] for ex in first["active"]]  # features score's split
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0 and spearman([1, 2, 3], [3, 2, 1]) == -1.0
    assert spearman([1, 2], [1, 2]) is None and spearman([1, 1, 1], [1, 2, 3]) is None
    with pytest.raises(ConfigError, match="multiple of --shown"):
        DelphiCheckConfig(run=tmp_path, n_examples=7, shown=5)
