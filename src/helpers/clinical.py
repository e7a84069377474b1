"""Age, sex and anatomical site: their encoding, the metadata-only model, and late fusion with an image network.

Every HAM10000 image comes with the patient's age and sex and the lesion's site. Three uses, one encoding:

- ``ClinicalEncoder``: one-hot sex and site, standardised age, and an explicit indicator for each missing value
  (HAM10000 writes "unknown" or leaves the field empty). Categories and scaling come from the training split alone;
  a value never seen in training sets its field's ``unseen`` indicator, never an error. Nothing is imputed from
  validation or test statistics.
- ``MetadataModel``: a multinomial logistic regression on those features, fitted on the training split, its
  regularisation chosen on validation. Alone it is the honest floor of the study (what the image adds over the
  chart); in late fusion it is the metadata expert.
- late fusion (product of experts): ``log p = log p_image + w (log p_meta - log prior)``; ``w`` is chosen on
  validation. Dividing by the prior keeps the class prior from being counted twice (both experts learned it).

The joint variant (a small metadata branch trained with the network) lives in ``model.MetadataResNet`` and takes
this encoder's features.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

COLUMNS = ("age", "sex", "localization")
MISSING_TOKENS = {"", "unknown", "nan", "none", "null"}
C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)          # inverse L2 strength of the metadata model
WEIGHT_GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5)      # late-fusion weight of the metadata expert


class MetadataColumnsError(ValueError):
    """A model that uses metadata was given a table without its columns; the message names them."""


def require_columns(df: pd.DataFrame, where: str) -> None:
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise MetadataColumnsError(
            f"{where}: this model uses the patient's metadata and needs the column(s) {missing} "
            f"(all of {list(COLUMNS)}; empty or 'unknown' values are allowed). Add them, or score the image "
            f"alone with --image-only.")


def _category(values: pd.Series) -> pd.Series:
    """Lower-case strings; missing values (NaN, empty, 'unknown') become None."""
    return pd.Series([None if pd.isna(v) or str(v).strip().lower() in MISSING_TOKENS else str(v).strip().lower()
                      for v in values], index=values.index, dtype=object)


class ClinicalEncoder:
    """Features from age, sex and site, with categories and scaling fitted on the training rows only."""

    def __init__(self, sexes, sites, age_mean: float, age_std: float):
        self.sexes, self.sites = list(sexes), list(sites)
        self.age_mean, self.age_std = float(age_mean), float(age_std)

    @classmethod
    def fit(cls, train: pd.DataFrame) -> "ClinicalEncoder":
        require_columns(train, "training table")
        age = pd.to_numeric(train["age"], errors="coerce").dropna()
        return cls(sorted(set(_category(train["sex"]).dropna())), sorted(set(_category(train["localization"]).dropna())),
                   age.mean() if len(age) else 0.0, age.std() if len(age) > 1 and age.std() > 0 else 1.0)

    @property
    def names(self) -> list[str]:
        return (["age", "age_missing"] + [f"sex={s}" for s in self.sexes] + ["sex_missing", "sex_unseen"]
                + [f"site={s}" for s in self.sites] + ["site_missing", "site_unseen"])

    def transform(self, df: pd.DataFrame) -> np.ndarray:
        """N x len(names) float32 features, in ``df``'s row order."""
        require_columns(df, "metadata table")
        age = pd.to_numeric(df["age"], errors="coerce").to_numpy(dtype=float)
        age_missing = np.isnan(age)
        parts = [np.where(age_missing, 0.0, (age - self.age_mean) / self.age_std)[:, None], age_missing[:, None]]
        for column, cats in (("sex", self.sexes), ("localization", self.sites)):
            v = _category(df[column]).tolist()
            missing = np.array([x is None for x in v], dtype=bool)
            parts.append(np.array([[x == c for c in cats] for x in v], dtype=bool).reshape(len(v), len(cats)))
            parts.append(missing[:, None])
            parts.append(np.array([x is not None and x not in cats for x in v], dtype=bool)[:, None])
        return np.concatenate(parts, 1).astype(np.float32)

    def to_dict(self) -> dict:
        return dict(sexes=self.sexes, sites=self.sites, age_mean=self.age_mean, age_std=self.age_std)

    @classmethod
    def from_dict(cls, d: dict) -> "ClinicalEncoder":
        return cls(d["sexes"], d["sites"], d["age_mean"], d["age_std"])


def macro_auc(y, probs: np.ndarray) -> float:
    y = np.asarray(y)
    n = probs.shape[1]
    present = [k for k in range(n) if 0 < (y == k).sum() < len(y)]
    if len(present) < 2:
        return float("nan")
    return float(np.mean([roc_auc_score(y == k, probs[:, k]) for k in present]))


class MetadataModel:
    """Logistic regression on ``ClinicalEncoder`` features: ``fit`` sees training labels only; validation labels
    choose the regularisation strength; test labels are never passed in."""

    def __init__(self, encoder: ClinicalEncoder, coef, intercept, n_classes: int, C: float):
        self.encoder, self.C, self.n_classes = encoder, float(C), int(n_classes)
        self.coef, self.intercept = np.asarray(coef, dtype=float), np.asarray(intercept, dtype=float)

    @classmethod
    def fit(cls, train: pd.DataFrame, val: pd.DataFrame, n_classes: int, grid=C_GRID) -> tuple["MetadataModel", list]:
        encoder = ClinicalEncoder.fit(train)
        x_train, x_val = encoder.transform(train), encoder.transform(val)
        y_train, y_val = train["label"].to_numpy(), val["label"].to_numpy()
        sweep, best = [], None
        for C in grid:
            lr = LogisticRegression(C=C, max_iter=5000).fit(x_train, y_train)
            m = cls._from_sklearn(encoder, lr, n_classes, C)
            score = macro_auc(y_val, m.predict_proba(val))
            sweep.append(dict(C=C, val_auc=score))
            if best is None or score > best[0] + 1e-12:  # ties keep the stronger regularisation (smaller C)
                best = (score, m)
        return best[1], sweep

    @classmethod
    def _from_sklearn(cls, encoder, lr: LogisticRegression, n_classes: int, C: float) -> "MetadataModel":
        # Classes absent from training get no score (a very negative logit), so every row sums to one over n.
        coef = np.zeros((n_classes, lr.coef_.shape[1]))
        intercept = np.full(n_classes, -30.0)
        coef[lr.classes_] = lr.coef_ if len(lr.classes_) > 2 else np.vstack([-lr.coef_ / 2, lr.coef_ / 2])
        intercept[lr.classes_] = lr.intercept_ if len(lr.classes_) > 2 else [-lr.intercept_[0] / 2, lr.intercept_[0] / 2]
        return cls(encoder, coef, intercept, n_classes, C)

    def predict_proba(self, df: pd.DataFrame) -> np.ndarray:
        z = self.encoder.transform(df).astype(float) @ self.coef.T + self.intercept
        z -= z.max(1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(1, keepdims=True)

    def to_dict(self) -> dict:
        return dict(encoder=self.encoder.to_dict(), coef=self.coef.tolist(), intercept=self.intercept.tolist(),
                    n_classes=self.n_classes, C=self.C)

    @classmethod
    def from_dict(cls, d: dict) -> "MetadataModel":
        return cls(ClinicalEncoder.from_dict(d["encoder"]), d["coef"], d["intercept"], d["n_classes"], d["C"])


# ---------------------------------------------------------------------------------------------------- late fusion
def fuse(p_image: np.ndarray, p_meta: np.ndarray, log_prior, weight: float) -> np.ndarray:
    """Product of experts: softmax(log p_image + weight (log p_meta - log prior)); weight 0 is the image alone."""
    z = np.log(np.clip(p_image, 1e-12, None))
    if weight:
        z = z + weight * (np.log(np.clip(p_meta, 1e-12, None)) - np.asarray(log_prior)[None, :])
    z -= z.max(1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(1, keepdims=True)


def choose_weight(p_image_val, p_meta_val, y_val, log_prior, grid=WEIGHT_GRID) -> tuple[float, list[dict]]:
    """The fusion weight with the best validation macro AUC (ties: the smaller weight), and the sweep."""
    sweep = [dict(weight=float(w), val_auc=macro_auc(y_val, fuse(p_image_val, p_meta_val, log_prior, w)))
             for w in grid]
    best = max(sweep, key=lambda r: (round(r["val_auc"], 12), -r["weight"]))
    return best["weight"], sweep


def fit_late_fusion(df: pd.DataFrame, p_image_val: np.ndarray, n_classes: int) -> dict:
    """Everything late fusion needs, fitted without test labels: the metadata model on the training rows, its C and
    the fusion weight on the validation rows. ``df`` holds the split column; ``p_image_val`` the image network's
    validation probabilities in ``df[df.split == "val"]``'s order. Returns a dict that ``late_fusion_proba`` uses
    and that is saved in the model's checkpoint."""
    train, val = df[df.split == "train"], df[df.split == "val"]
    meta_model, c_sweep = MetadataModel.fit(train, val, n_classes)
    prior = np.bincount(train["label"].to_numpy(), minlength=n_classes) / len(train)
    log_prior = np.log(np.clip(prior, 1e-12, None))
    weight, w_sweep = choose_weight(p_image_val, meta_model.predict_proba(val), val["label"].to_numpy(), log_prior)
    return dict(mode="late", metadata_model=meta_model.to_dict(), log_prior=log_prior.tolist(), weight=weight,
                weight_sweep=w_sweep, C_sweep=c_sweep)


def late_fusion_proba(fusion: dict, p_image: np.ndarray, df: pd.DataFrame) -> np.ndarray:
    """Fused probabilities for rows of ``df`` (which must hold age, sex and localization)."""
    p_meta = MetadataModel.from_dict(fusion["metadata_model"]).predict_proba(df)
    return fuse(p_image, p_meta, fusion["log_prior"], fusion["weight"])
