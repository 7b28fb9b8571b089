"""What securely aggregated model updates cost per site and round (``federation.secure_aggregation``).

Run from the repository root::

    python -m simulations.benchmarks.bench_secure_updates                  # 3 and 5 sites, both networks
    python -m simulations.benchmarks.bench_secure_updates --sites 4 --networks densenet121

For each network (its real parameter count, weights packed as on the wire: one float32 array and the
integer buffers) and number of training sites, every site masks its weighted update in a kept
session (:mod:`client.secure_updates`, the real site code: ledger check, fixed-point encoding,
pairwise AES-CTR masks) and the server sums and decodes the mean
(:func:`shared.secure_updates.mean_from_sum`). Printed: seconds per site to mask one round (mean
over sites and ``--rounds`` rounds after the key exchange), the server's seconds to sum and decode,
bytes each site uploads, and the ratio to the plain float32 update, and the largest error of the
mean against float64 FedAvg. All sites run in this one process, one after the other.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from client.secure_updates import mask_update
from shared.models import build_model
from shared.records import pack_arrays
from shared.secagg import SiteSecAgg, aggregate, make_identities, route_envelopes
from shared.secure_updates import mean_from_sum


def packed_weights(network: str, slice_size: int, seed: int) -> dict[str, np.ndarray]:
    net = build_model(network, slice_size=slice_size)
    arrays = {k: v.detach().cpu().numpy() for k, v in net.state_dict().items()}
    record, _ = pack_arrays(arrays)
    rng = np.random.default_rng(seed)
    out = {}
    for k, v in record.items():
        a = v.numpy()
        out[k] = (a + rng.normal(0, 1e-3, a.shape)).astype(a.dtype) if a.dtype.kind == "f" else a
    return out


def bench(network: str, slice_size: int, n_sites: int, rounds: int, root: Path) -> dict[str, float]:
    names = [f"site_{i:02d}" for i in range(n_sites)]
    keys, roster = make_identities(names)
    sas = {s: SiteSecAgg(s, keys[s], roster, root / s / "secagg") for s in names}
    n = {s: 20 + 7 * i for i, s in enumerate(names)}
    sid = f"bench.train.{network}.{n_sites}"
    adverts = {s: sas[s].advertise(sid, names, query_id=sid) for s in names}
    inbox = route_envelopes({s: sas[s].share(sid, adverts) for s in names}, names)
    t_mask, t_server, up, err = [], [], 0, 0.0
    for r in range(rounds):
        ups = {s: packed_weights(network, slice_size, seed=100 * r + i) for i, s in enumerate(names)}
        masked = {}
        for s in names:
            t = time.perf_counter()
            masked[s] = mask_update(sas[s], root / s, site=s, session=sid, envelopes=inbox[s] if r == 0 else None,
                                    arrays=ups[s], n=n[s], weights_digest=f"{network}-{r}")
            t_mask.append(time.perf_counter() - t)
        up = int(np.mean([sum(a.nbytes for a in m.values()) for m in masked.values()]))
        t = time.perf_counter()
        mean, total_n = mean_from_sum(aggregate(masked, names), {k: v.shape for k, v in ups[names[0]].items()})
        t_server.append(time.perf_counter() - t)
        for k in mean:
            want = sum(n[s] * ups[s][k].astype(np.float64) for s in names) / total_n
            err = max(err, float(np.max(np.abs(mean[k] - want))))
    plain = sum(a.nbytes for a in ups[names[0]].values())
    params = sum(a.size for a in ups[names[0]].values())
    return {"params": params, "mask_s": float(np.mean(t_mask)), "server_s": float(np.mean(t_server)),
            "up": up, "plain": plain, "err": err}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, nargs="+", default=[3, 5])
    ap.add_argument("--networks", nargs="+", default=["densenet_tiny", "densenet121"])
    ap.add_argument("--slice-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    print(f"{'network':14s} {'params':>10s} {'sites':>5s} {'mask s/site':>11s} {'server s':>9s} "
          f"{'upload/site':>12s} {'x plain':>7s} {'max err':>9s}")
    with tempfile.TemporaryDirectory() as tmp:
        for net in args.networks:
            for k in args.sites:
                r = bench(net, args.slice_size, k, args.rounds, Path(tmp) / f"{net}-{k}")
                print(f"{net:14s} {r['params']:10d} {k:5d} {r['mask_s']:11.3f} {r['server_s']:9.3f} "
                      f"{r['up'] / 1e6:10.2f} MB {r['up'] / r['plain']:7.2f} {r['err']:9.1e}")


if __name__ == "__main__":
    main()
