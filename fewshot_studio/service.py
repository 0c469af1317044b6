"""UI-agnostic application service: what the page (or any other front end) asks of the core."""
from __future__ import annotations

import threading

from .backbone import Backbone, BackboneSpec, load_backbone
from .cache import FeatureCache
from .data import ImageRef, SupportSet
from .errors import DataError, FewShotError, WeightsUnavailableError
from .features import FeatureExtractor


class Studio:
    """Holds the loaded backbone (loaded lazily, once) and answers requests."""

    def __init__(self, spec: BackboneSpec | None = None):
        self.spec = spec or BackboneSpec.from_env()
        self._backbone: Backbone | None = None
        self._error: str | None = None
        self._lock = threading.Lock()

    def backbone(self) -> Backbone:
        with self._lock:
            if self._backbone is None:
                try:
                    self._backbone = load_backbone(self.spec)
                    self._error = None
                except WeightsUnavailableError as e:
                    self._error = str(e)
                    raise
            return self._backbone

    def status_line(self) -> str:
        try:
            b = self.backbone()
            return f"**Backbone:** {b.spec.label} · **Device:** {b.device_label}"
        except FewShotError as e:
            return f"⚠️ **Backbone unavailable:** {e}"

    def zero_shot(self, names: str, image) -> dict[str, float]:
        from .methods import make_method

        classes = [n.strip() for n in (names or "").split(",") if n.strip()]
        if image is None:
            raise DataError("Upload an image first.")
        b = self.backbone()
        method = make_method("zeroshot", b, classes)
        extractor = FeatureExtractor(b, FeatureCache())
        method.fit(SupportSet(classes), extractor)
        probs = method.predict_proba([ImageRef.from_pil(image)], extractor)[0].tolist()
        return dict(zip(classes, probs))
