from mechsub import bench


def test_bench_reports_ratios_on_tiny(tmp_path):
    cfg = bench.BenchConfig(model="tiny", n_prompts=8, hf_batch_size=4, batch_size=8, max_new_tokens=10,
                            train_batch_size=4, train_steps=1)  # fmt: skip
    m = bench.run(cfg, tmp_path / "b")
    g, t, c = m["generation"], m["training"], m["capture"]
    assert g["ratio"] > 0 and g["hf_generate_new_tok_per_s"] > 0
    for k in ("plain_peft_sft_tok_per_s", "mechsub_sft_tok_per_s", "mechsub_distill_tok_per_s"):
        assert t[k] > 0
    assert c["hooks"] == 2 and c["capture_s"] > 0 and c["plain_forward_s"] > 0
