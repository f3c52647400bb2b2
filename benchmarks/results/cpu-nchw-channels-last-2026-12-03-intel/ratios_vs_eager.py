import json, sys, statistics as st
def q(v):
    v = sorted(v); n = len(v)
    qs = st.quantiles(v, n=4)
    return qs[0], st.median(v), qs[2]
for path in sys.argv[1:]:
    d = json.load(open(path))
    rows = {}
    for r in d["rows"]:
        rows.setdefault(r["mode"], {})[r["provider"]] = r
    for mode, rs in rows.items():
        if "eager" not in rs: continue
        e = rs["eager"]["samples_s"]
        print(path.split("/")[-2], mode)
        for p in rs:
            if "nchw" in p or p == "eager":
                s = rs[p]["samples_s"]
                ratios = [a / b for a, b in zip(e, s)]
                lo, med, hi = q(ratios)
                print(f"  {p:16s} vs eager: median of medians {st.median(e)/st.median(s):.3f}x, per-round {lo:.3f}-{hi:.3f} (median {med:.3f})")
