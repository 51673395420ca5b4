"""Evaluation metrics on plain Python lists: accuracy, Matthews correlation (CoLA), corpus BLEU (E2E)."""

from __future__ import annotations

import math


def accuracy(predictions: list[int], labels: list[int]) -> float:
    """Fraction of predictions equal to the labels."""
    if not labels:
        return float("nan")
    return sum(int(p == y) for p, y in zip(predictions, labels)) / len(labels)


def matthews_corrcoef(predictions: list[int], labels: list[int]) -> float:
    """Matthews correlation coefficient, multiclass (Gorodkin 2004's R_K; the binary MCC for two classes),
    as GLUE reports for CoLA. 0 when either side is constant (sklearn's convention)."""
    classes = sorted(set(labels) | set(predictions))
    index = {c: i for i, c in enumerate(classes)}
    k = len(classes)
    confusion = [[0] * k for _ in range(k)]
    for p, y in zip(predictions, labels):
        confusion[index[y]][index[p]] += 1
    n = len(labels)
    correct = sum(confusion[i][i] for i in range(k))
    true_totals = [sum(row) for row in confusion]                                # t_k
    pred_totals = [sum(confusion[i][j] for i in range(k)) for j in range(k)]     # p_k
    cov_yp = correct * n - sum(t * p for t, p in zip(true_totals, pred_totals))
    cov_yy = n * n - sum(t * t for t in true_totals)
    cov_pp = n * n - sum(p * p for p in pred_totals)
    if cov_yy == 0 or cov_pp == 0:
        return 0.0
    return cov_yp / math.sqrt(cov_yy * cov_pp)


def corpus_bleu(hypotheses: list[str], references: list[list[str]]) -> float:
    """sacrebleu's corpus BLEU (0-100, default 13a tokenisation) with a varying number of references per
    hypothesis (E2E has several per meaning representation)."""
    import sacrebleu

    if not hypotheses:
        return float("nan")
    width = max(len(r) for r in references)
    # sacrebleu wants reference *streams*; a hypothesis with fewer references gets None (ignored).
    streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(width)]
    return float(sacrebleu.corpus_bleu(hypotheses, streams).score)
