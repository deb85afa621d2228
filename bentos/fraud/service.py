"""BentoML service of the fraud model: the released MLflow version behind typed HTTP APIs built from its contract.

APIs: POST /predict, /predict_batch and /predict_card (by card_id); see `loopform.serving.bento`.
"""

from loopform.serving.bento import model_service
from models.fraud.contract import CONTRACT

FraudService = model_service(CONTRACT)
