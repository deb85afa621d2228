"""BentoML service of the delivery-time model: the released MLflow version behind typed HTTP APIs built from its
contract.

APIs: POST /predict, /predict_batch and /predict_restaurant (by restaurant_id); see `loopform.serving.bento`.
"""

from loopform.serving.bento import model_service
from models.delivery.contract import CONTRACT

DeliveryService = model_service(CONTRACT)
