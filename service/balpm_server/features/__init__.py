"""Feature extraction behind one small interface (`FeatureExtractor`)."""

from balpm_server.features.base import FeatureExtractor, build_extractor

__all__ = ["FeatureExtractor", "build_extractor"]
