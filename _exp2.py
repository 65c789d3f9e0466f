import sys, math, torch, warnings
sys.path.insert(0, "tests")
from test_evaluation import _linear_gaussian
from helpers import gen
import fastvae
for s in range(6):
    x, encode, decode = _linear_gaussian("cpu", 0.1, B=4)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        st = fastvae.log_likelihood(x, encode, decode, k=800, likelihood="gaussian", generator=gen(s), return_stats=True, target_stderr=0.5)
    print(st.k_used.tolist(), st.pareto_k.tolist(), st.stderr.tolist(), [str(i.message)[:40] for i in w])
