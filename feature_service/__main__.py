"""`python -m feature_service`: settings from FEATURE_SERVICE_* env variables."""

from feature_service.server import FeatureService
from feature_service.settings import FeatureServiceSettings
from infermesh.service import main

main(lambda: FeatureService(FeatureServiceSettings()))
