"""Expert-parallel dispatch volume with and without node-limited routing, 4-node EP layout.

Routing decisions only (no processes): T tokens per source rank of an EP32 layout over 4 nodes
(8 ranks each), E=64 experts, top-8, V3-style sigmoid gate with a random balancing bias, hidden
7168 in bf16 (2 bytes). For each layout we count, per token:
- rows sent to other nodes when every routed copy is sent separately (megads's all-to-all), and
- rows a node-deduplicating dispatch (one copy per distinct remote node, forwarded inside the
  node, as DeepEP does) would send;
with node_limit M = off, 3, 2, 1 (each token's experts span at most M nodes).

    python bench/dispatch.py
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megads.ops import reference  # noqa: E402


def volume(T=4096, E=64, k=8, nodes=4, ranks=32, hidden=7168, node_limit=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g)
    bias = 0.1 * torch.randn(E, generator=g)
    mask = None
    if node_limit:
        mask = reference.node_limit_mask(logits, bias, num_nodes=nodes, max_nodes=node_limit, top_k=k,
                                         score_func="sigmoid")
    _, idx, _ = reference.route(logits, bias, top_k=k, score_func="sigmoid", expert_mask=mask)
    src_node = torch.randint(0, nodes, (T,), generator=g)  # the token's own node
    node_of = idx // (E // nodes)
    copies_remote = (node_of != src_node[:, None]).sum(1).float()
    hit = torch.zeros(T, nodes, dtype=torch.bool).scatter_(1, node_of, True)
    span = hit.sum(1).float()
    hit[torch.arange(T), src_node] = False
    dedup = hit.sum(1).float()
    b = hidden * 2
    return span.max().item(), span.mean().item(), copies_remote.mean().item() * b, dedup.mean().item() * b


def main():
    print("| node limit M | max nodes/token | mean nodes/token | cross-node bytes/token, per copy | "
          "cross-node bytes/token, node-deduplicated |")
    print("|---|---|---|---|---|")
    for m in (0, 3, 2, 1):
        mx, mean, per_copy, dedup = volume(node_limit=m)
        print(f"| {'off' if m == 0 else m} | {mx:.0f} | {mean:.2f} | {per_copy:,.0f} | {dedup:,.0f} |")


if __name__ == "__main__":
    main()
