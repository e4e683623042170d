"""Find which attention variant trips torch.compile on CUDA, and print the generated line."""
import re, sys
from pathlib import Path
import torch, torch.nn.functional as F
sys.path.insert(0, "src")
from mea import ModelConfig, Transformer

for att, kw in [("mha", {}), ("mea", {}), ("gqa", {"n_kv_heads": 2})]:
    for tf32 in (False, True):
        torch._dynamo.reset()
        torch.backends.cuda.matmul.allow_tf32 = tf32
        cfg = ModelConfig.from_preset("tiny", attention=att, n_layers=2, **kw)
        m = Transformer(cfg).cuda()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True)
        f = torch.compile(m)
        x = torch.randint(0, cfg.vocab_size, (4, 257), device="cuda")
        inp, tgt = x[:, :-1].contiguous(), x[:, 1:].contiguous()
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = f(inp)
            F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten()).backward()
            opt.step()
            print(att, "tf32", tf32, "ok", flush=True)
        except Exception as e:
            msg = str(e)
            print(att, "tf32", tf32, "FAIL", msg[-300:], flush=True)
            mm = re.search(r"import (/tmp/\S+\.py)", msg)
            ln = re.search(r"line (\d+)\)", msg)
            if mm and ln:
                lines = Path(mm.group(1)).read_text().splitlines()
                n = int(ln.group(1))
                print("\n".join(lines[n - 4:n + 2]))
