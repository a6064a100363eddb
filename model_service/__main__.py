"""`python -m model_service`: settings from MODEL_SERVICE_* env variables."""

from infermesh.service import main
from model_service.server import ModelService
from model_service.settings import ModelServiceSettings

main(lambda: ModelService(ModelServiceSettings()))
