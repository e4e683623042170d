"""`mea generate` on the CPU: a run trained for a few steps, its Hugging Face export and a converted
model; one prompt streamed, a file of prompts in batches. Its bad inputs are in test_faults.py."""
import json
import sys

import pytest
import torch

from mea.cli import main

pytest.importorskip("transformers")
PROMPT = "The river runs past"


def greedy(model_dir, prompt: str, n: int) -> str:
    """The greedy continuation as the core model gives it, cut at the end-of-text token."""
    from mea.io import load_model, load_tokenizer_for

    model, tok = load_model(model_dir), load_tokenizer_for(model_dir)
    ids = tok(prompt)["input_ids"]
    new = model.generate(torch.tensor([ids]), max_new_tokens=n)[0, len(ids):].tolist()
    if tok.eos_token_id in new:
        new = new[:new.index(tok.eos_token_id)]
    return tok.decode(new, skip_special_tokens=True)


def test_one_prompt_is_streamed_as_it_is_generated(tiny_run, capfd, monkeypatch):
    from mea.io import load_model

    main(["generate", str(tiny_run), "--prompt", PROMPT, "--max_new_tokens", "8", "--device", "cpu"])
    out, err = capfd.readouterr()
    assert out == PROMPT + greedy(tiny_run, PROMPT, 8) + "\n"
    kv = load_model(tiny_run).config.kv_cache_bytes_per_token
    assert f"mea (h'=1 of 2 heads)" in err and f"KV cache {kv:,} bytes per token" in err
    # piece by piece: the prompt, then the text of each new token as it comes (not all at the end)
    pieces = []

    class Stdout:
        def write(self, s):
            pieces.append(s)

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stdout", Stdout())
    main(["generate", str(tiny_run), "--prompt", PROMPT, "--max_new_tokens", "8", "--device", "cpu"])
    assert pieces[0] == PROMPT and "".join(pieces) == out and len([p for p in pieces[1:] if p.strip()]) >= 3
    # sampling from the single most likely token is greedy; one seed gives one sample
    pieces.clear()
    main(["generate", str(tiny_run), "--prompt", PROMPT, "--max_new_tokens", "8", "--temperature", "1.0",
          "--top_k", "1", "--device", "cpu"])
    assert "".join(pieces) == out
    runs = []
    for _ in range(2):
        pieces.clear()
        main(["generate", str(tiny_run), "--prompt", PROMPT, "--max_new_tokens", "8", "--temperature", "1.5",
              "--top_p", "0.9", "--seed", "3", "--device", "cpu"])
        runs.append("".join(pieces))
    assert runs[0] == runs[1]


def test_prompts_file_from_an_export_and_a_converted_model(tiny_run, tmp_path, capfd):
    """A JSONL file of prompts through the Hugging Face export (left-padded batches give each prompt's own
    greedy text) and through `mea convert`'s folder; each record keeps its keys."""
    prompts = ["The river", "In spring the water rises and", "Story 3."]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n\n" for i, p in enumerate(prompts)))
    main(["export-hf", str(tiny_run), str(tmp_path / "hf")])
    main(["generate", str(tmp_path / "hf"), "--prompts", str(tmp_path / "p.jsonl"), "--max_new_tokens", "6",
          "--batch_size", "2", "--out", str(tmp_path / "out.jsonl"), "--device", "cpu"])
    got = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in got] == [0, 1, 2] and [r["prompt"] for r in got] == prompts
    assert [r["completion"] for r in got] == [greedy(tiny_run, p, 6) for p in prompts]
    assert all(0 < r["new_tokens"] <= 6 for r in got)
    capfd.readouterr()
    main(["convert", str(tiny_run), "--kv_heads", "1", "--calib_tokens", "0", "--out", str(tmp_path / "conv"), "--device", "cpu"])
    capfd.readouterr()
    main(["generate", str(tmp_path / "conv"), "--prompts", str(tmp_path / "p.jsonl"), "--max_new_tokens", "4",
          "--device", "cpu"])
    out, err = capfd.readouterr()
    lines = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in lines] == prompts and "mea (h'=1 of 2 heads)" in err
