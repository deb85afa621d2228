"""The delivery model: an MLP over the order's and the restaurant's features that predicts delivery minutes.

Everything but the class name is `loopform.tabular.TabularRegressor`'s: the network predicts
the standardised label and `predict` scales it back with the label's training mean and standard
deviation, which the preprocessing JSON keeps next to the feature statistics (see
`loopform.tabular.TabularModel` for the pickle-free format).
"""

from loopform.tabular import TabularRegressor


class DeliveryModel(TabularRegressor):
    """MLP delivery-time regressor; `predict(frame)` gives minutes per row of a raw feature DataFrame."""
