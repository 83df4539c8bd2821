"""Run the evaluation corpora of a RunConfig (retrieval, temporal probe) on a model; results carry their protocol."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from stmvl.config import RunConfig
from stmvl.eval.probe import evaluate_probe_orders
from stmvl.eval.retrieval import evaluate_retrieval

from .data import eval_datasets


def evaluate_corpora(model, cfg: RunConfig, device: torch.device | str, autocast: bool = False,
                     kinds: tuple[str, ...] = ("retrieval", "probe"), final: bool = True,
                     similarity_dir: Path | None = None) -> dict[str, Any]:
    """{corpus name: result} for every eval corpus of the requested kinds.

    Retrieval results hold both tables ("itc", "itm"); probe results hold ITC / ITM accuracy, and, with
    eval.shuffled_frames_control, the same probe with the frames of every clip in a shuffled order under
    "<name>_shuffled" (an order-aware model must fall to about chance there). Without ITM (eval.itm 'never', or
    'final' when ``final`` is False: an intermediate evaluation of a run) only the ITC table and accuracy are there.
    ``similarity_dir``: also write each retrieval corpus' ITC similarity there (:func:`save_similarity`).
    """
    ev = cfg.eval
    itm = uses_itm(ev.itm, final)
    common = dict(batch_size=ev.batch_size, num_workers=ev.num_workers, device=device, autocast=autocast,
                  max_text_len=ev.text_max_length, itm=itm)
    results: dict[str, Any] = {}
    for name, (corpus, dataset) in eval_datasets(cfg, kinds).items():
        if corpus.kind == "retrieval":
            # the matrix is copied off the device only when it is to be written (the final evaluation of a run)
            similarity: dict[str, torch.Tensor] | None = {} if similarity_dir is not None else None
            results[name] = evaluate_retrieval(model, dataset, k_test=ev.k_test, similarity_out=similarity, **common)
            if similarity is not None:
                save_similarity(Path(similarity_dir) / f"{name}.pt", similarity["itc"], dataset)
        elif corpus.kind == "probe":
            # the control in the same pass: each clip decoded once, each caption and foil encoded once
            orders = (None, "permute") if ev.shuffled_frames_control else (None,)
            scored = evaluate_probe_orders(model, dataset, orders, seed=cfg.runtime.seed, **common)
            results[name] = scored[0]
            if ev.shuffled_frames_control:
                results[f"{name}_shuffled"] = scored[1]
    return results


def save_similarity(path: Path, similarity: torch.Tensor, dataset) -> Path:
    """Write ``{"itc": float [texts, videos], "texts": [str], "videos": [media path of each column]}`` to ``path``
    (torch.save): what the ITC table ranked, to see which clip each text put first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    videos = [str(dataset.media_path(record)) for record in dataset.records]
    torch.save({"itc": similarity, "texts": list(dataset.texts), "videos": videos}, path)
    return path


def uses_itm(choice: str, final: bool) -> bool:
    """Whether an evaluation scores with the VTM head under ``eval.itm`` (every / final / never)."""
    if choice not in ("every", "final", "never"):
        raise ValueError(f"eval.itm {choice!r}: expected one of every, final, never")
    return choice == "every" or (choice == "final" and final)


def summary_lines(results: dict[str, Any]) -> list[str]:
    """One human-readable line per table: retrieval R@1/5/10 both directions, probe, multiple-choice and QA
    accuracies, with the protocol."""
    lines = []
    for name, res in results.items():
        proto = res.get("protocol", {})
        where = ", ".join(f"{k}={v}" for k, v in proto.items() if k in ("num_frames", "sampling", "k_test", "split"))
        if "itc" in res and "t2v_r1" in res["itc"]:  # retrieval: the ITM table only where ITM scored
            for table in [t for t in ("itm", "itc") if t in res]:
                m = res[table]
                lines.append(f"{name} [{table}] t2v R@1/5/10 {m['t2v_r1']:.1f}/{m['t2v_r5']:.1f}/{m['t2v_r10']:.1f}  "
                             f"v2t R@1/5/10 {m['v2t_r1']:.1f}/{m['v2t_r5']:.1f}/{m['v2t_r10']:.1f}  ({where})")
        elif "acc" in res and "itc_acc" in res:  # multiple choice: the combined score and its two parts
            lines.append(f"{name}: multiple-choice accuracy {100 * res['acc']:.1f}% (ITM only "
                         f"{100 * res['itm_acc']:.1f}%, ITC only {100 * res['itc_acc']:.1f}%) n={res['n']} ({where})")
        elif "itc_acc" in res:
            itm = f"  ITM {100 * res['itm_acc']:.1f}%" if "itm_acc" in res else ""
            lines.append(f"{name}: probe accuracy ITC {100 * res['itc_acc']:.1f}%{itm}  n={res['n']} ({where})")
        elif "acc" in res:
            lines.append(f"{name}: accuracy {100 * res['acc']:.1f}% n={res.get('n')} ({where})")
    return lines
