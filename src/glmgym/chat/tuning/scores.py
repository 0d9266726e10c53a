"""BLEU-4 and Rouge-1/2/L of generated text, computed as THUDM's `ptuning/main.py` does.

Rouge: `rouge_chinese.Rouge` F-scores on jieba-segmented, space-joined text. BLEU-4: nltk's
`sentence_bleu` on characters with smoothing method 3. Both x 100, averaged over the samples.
Deviation: an empty prediction or label scores 0 (the reference's Rouge raises on it).
"""

from __future__ import annotations

from glmgym.errors import import_extra

__all__ = ["generation_scores"]


def generation_scores(predictions: list[str], labels: list[str]) -> dict[str, float]:
    """{"bleu-4", "rouge-1", "rouge-2", "rouge-l"}: means over the pairs, x 100."""
    jieba = import_extra("jieba", "finetune")
    rouge_chinese = import_extra("rouge_chinese", "finetune")
    bleu = import_extra("nltk.translate.bleu_score", "finetune")
    jieba.setLogLevel(60)  # no "Building prefix dict" chatter
    smooth = bleu.SmoothingFunction().method3
    rouge = rouge_chinese.Rouge()
    scores: dict[str, list[float]] = {"rouge-1": [], "rouge-2": [], "rouge-l": [], "bleu-4": []}
    for pred, label in zip(predictions, labels, strict=True):
        hyp, ref = " ".join(jieba.cut(pred)), " ".join(jieba.cut(label))
        if hyp.strip() and ref.strip():
            result = rouge.get_scores(hyp, ref)[0]
            for key in ("rouge-1", "rouge-2", "rouge-l"):
                scores[key].append(result[key]["f"] * 100)
            chars = bleu.sentence_bleu([list(label)], list(pred), smoothing_function=smooth)
            scores["bleu-4"].append(chars * 100)
        else:
            for values in scores.values():
                values.append(0.0)
    return {k: sum(v) / len(v) if v else 0.0 for k, v in scores.items()}
