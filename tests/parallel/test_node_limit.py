"""Node-limited routing: each token's experts span at most M EP nodes, chosen by node score."""
import itertools

import torch

from megads.ops import reference


def test_experts_span_at_most_m_nodes_and_nodes_are_the_best():
    g = torch.Generator().manual_seed(0)
    T, E, k, nodes = 200, 32, 6, 4
    logits = torch.randn(T, E, generator=g)
    bias = 0.2 * torch.randn(E, generator=g)
    for M in (1, 2, 3):
        mask = reference.node_limit_mask(logits, bias, num_nodes=nodes, max_nodes=M, top_k=k, score_func="sigmoid")
        _, idx, _ = reference.route(logits, bias, top_k=k, score_func="sigmoid", expert_mask=mask)
        node_of = idx // (E // nodes)
        for t in range(T):
            assert len(set(node_of[t].tolist())) <= M
        # brute force: the kept nodes maximise the sum of each node's top ceil(k/M) biased scores
        sel = torch.sigmoid(logits) + bias
        per = -(-k // M)
        for t in range(0, T, 17):
            node_score = [sel[t, n * 8:(n + 1) * 8].topk(per).values.sum().item() for n in range(nodes)]
            best = max(itertools.combinations(range(nodes), M), key=lambda c: sum(node_score[i] for i in c))
            assert set(node_of[t].tolist()) <= set(best)


def test_no_limit_when_m_equals_nodes():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(50, 16, generator=g)
    mask = reference.node_limit_mask(logits, None, num_nodes=4, max_nodes=4, top_k=4, score_func="softmax")
    a = reference.route(logits, None, top_k=4, score_func="softmax", expert_mask=mask)
    b = reference.route(logits, None, top_k=4, score_func="softmax")
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])
