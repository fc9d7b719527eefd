"""(As run on 2026-12-07, before the kernel clamped its length to the buffer.) Where does split-K decoding fault at 32K? Each case in its own process (a fault kills the CUDA context)."""
import subprocess
import sys
CASES = {
 "kernel-bf16-32k": "q,k,v=(torch.randn(1,H,1,64,device='cuda',dtype=torch.bfloat16),)+tuple(torch.randn(1,3,32768,64,device='cuda',dtype=torch.bfloat16) for _ in range(2)); L=torch.tensor([32701],device='cuda')",
 "kernel-bf16-32k-b8": "q,k,v=(torch.randn(8,H,1,64,device='cuda',dtype=torch.bfloat16),)+tuple(torch.randn(8,3,32768,64,device='cuda',dtype=torch.bfloat16) for _ in range(2)); L=torch.full((8,),32701,device='cuda')",
 "kernel-bf16-8k": "q,k,v=(torch.randn(1,H,1,64,device='cuda',dtype=torch.bfloat16),)+tuple(torch.randn(1,3,8192,64,device='cuda',dtype=torch.bfloat16) for _ in range(2)); L=torch.tensor([8125],device='cuda')",
 "kernel-fp32-32k": "q,k,v=(torch.randn(1,H,1,64,device='cuda'),)+tuple(torch.randn(1,3,32768,64,device='cuda') for _ in range(2)); L=torch.tensor([32701],device='cuda')",
}
BODY = """
import torch, torch.nn.functional as F
from attnprobe.kernels.softmax import decode
H=9
{setup}
got = decode.split_k_decode(q,k,v,L,0.125); torch.cuda.synchronize()
n=int(L[0]); g=q.shape[1]//k.shape[1]
want = F.scaled_dot_product_attention(q[:1].float(), k[:1,:,:n].repeat_interleave(g,1).float(), v[:1,:,:n].repeat_interleave(g,1).float(), scale=0.125)
print('maxerr', (got[:1].float()-want).abs().max().item(), 'splits', decode.split_count(k.shape[0]*k.shape[1], k.shape[2], decode.programs_to_fill(q.device)))
"""
MODEL = """
import torch, sys
sys.path.insert(0, 'benchmarks')
from decode_bench import shape_model, random_weights_like
from attnprobe.analyses.efficiency.decoding import measure_decoding
m = random_weights_like(shape_model('smollm2','cuda',torch.bfloat16), {ctx})
r = measure_decoding(m, None, [], {ctx}, new_tokens=8, batch=1, graph={graph}, attention='split-k')
print('ok', r['decode_tokens_per_s'])
"""
for ctx in (8192, 16384, 32768):
    for graph in (True,):
        CASES[f"model-{ctx}-graph{graph}"] = None
out = {}
for name, setup in CASES.items():
    if setup is None:
        _, ctx, g = name.split("-")
        code = MODEL.format(ctx=ctx, graph=g == "graphTrue")
    else:
        code = BODY.format(setup=setup)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=90,
                       env={**__import__('os').environ, "CUDA_LAUNCH_BLOCKING": "1"})
    out[name] = (p.returncode, (p.stdout + p.stderr).strip().splitlines()[-1:] )
    print(name, out[name], flush=True)
