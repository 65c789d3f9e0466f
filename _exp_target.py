import sys, math, torch, warnings
sys.path.insert(0, "tests")
from test_evaluation import ppca
from helpers import gen
import fastvae
x, exact, encode, decode, _ = ppca(B=8)
shift = torch.linspace(0, 1.2, 8, dtype=torch.float64)[:, None]
def enc(a):
    mu, lv = encode(a)
    return mu + shift * torch.exp(lv / 2), lv + math.log(1.5)
rows = []
def dec(z):
    rows.append(tuple(z.shape[:2])); return decode(z)
import time; t=time.time()
st = fastvae.log_likelihood(x, enc, dec, k=5000, likelihood="gaussian", generator=gen(1), return_stats=True, target_stderr=0.05)
print(time.time()-t)
print(st.k_used, st.stderr, ((st.log_likelihood-exact)/st.stderr), st.pareto_k, rows)
