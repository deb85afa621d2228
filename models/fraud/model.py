"""The fraud model: an MLP over standardised numeric and one-hot categorical features.

Everything but the class name is `loopform.tabular.TabularClassifier`'s: preprocessing
(standardisation statistics, category vocabularies, the feature order) and the operating
threshold live in its code and in the JSON `preprocessing()` returns; the network alone is
exported with torch.export (MLflow's `pt2` format). Nothing is pickled: a stored version is the
exported program (raw tensor bytes + graph JSON) plus that JSON, and `from_exported` rebuilds
the model from them with this code (the service and the champion comparison then call
`predict_proba`).
"""

from loopform.tabular import TabularClassifier


class FraudModel(TabularClassifier):
    """MLP fraud scorer: the network's output is the logit of fraud; `threshold` turns scores into alerts."""
