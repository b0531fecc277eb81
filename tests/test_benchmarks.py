import json

from benchmarks.__main__ import main


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
                "label_stats_features_s", "label_local_features_s", "judge_local_contexts_s", "peak_rss_mb"):
        assert i[key] > 0, key
