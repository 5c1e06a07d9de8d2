"""imaged's ready images in the frontend, and the ListImages and ImageStatus answers read from them.

Each image is kept as imaged's feed gave it (services/imaged/state_feed.py):
its record as ListImages gives it, and when it was pulled. A reference is
answered here when it is an image's id (with or without `sha256:`) or one of
its names exactly as imaged keeps them (`docker.io/library/busybox:latest`);
any other text (a short name, an id prefix, an image not here) is resolved by
imaged, which knows the search registries and the reference grammar.
"""

from __future__ import annotations

from typing import Any

from cri_api.v1 import api_pb2

from services.frontend.image_convert import to_image


class _Image:
    __slots__ = ("record", "_message", "_response")

    def __init__(self, record: dict[str, Any]) -> None:
        self.record = record
        self._message: api_pb2.Image | None = None
        self._response: api_pb2.ImageStatusResponse | None = None

    @property
    def complete(self) -> bool:
        """Whether its size is known (else imaged's stand-in waits for storaged's measure: image_convert)."""
        return self.record.get("unpacked_size") is not None or not self.record.get("top_layer")

    def message(self) -> api_pb2.Image:
        if self._message is None:
            self._message = to_image(self.record)
        return self._message

    def response(self) -> api_pb2.ImageStatusResponse:
        if self._response is None:
            self._response = api_pb2.ImageStatusResponse(image=self.message())
        return self._response


class ImageView:
    def __init__(self) -> None:
        self.images: dict[str, _Image] = {}
        self.names: dict[str, str] = {}
        self._list: api_pb2.ListImagesResponse | None = None

    # -- kept by the feed ---------------------------------------------------------------

    def reset(self, views: dict[str, Any]) -> None:
        self.images, self.names, self._list = {}, {}, None
        for key, view in views.items():
            self.apply(key, view)

    def apply(self, key: str, view: dict[str, Any] | None) -> None:
        kind, _, image_id = key.partition("/")
        if kind != "image":
            raise ValueError(f"unknown kind of object {key!r}")
        self._list = None
        old = self.images.pop(image_id, None)
        if old is not None:
            for name in old.record["repo_tags"] + old.record["repo_digests"]:
                if self.names.get(name) == image_id:
                    del self.names[name]
        if view is not None:
            self.images[image_id] = _Image(view)
            for name in view["repo_tags"] + view["repo_digests"]:
                self.names[name] = image_id

    # -- answers --------------------------------------------------------------------------

    def find(self, reference: str) -> _Image | None:
        """The image `reference` names, when it is an id or a name as kept; None: ask imaged."""
        return (self.images.get(reference) or self.images.get("sha256:" + reference)
                or self.images.get(self.names.get(reference, "")))

    def image_status(self, reference: str) -> api_pb2.ImageStatusResponse | None:
        image = self.find(reference)
        return image.response() if image is not None and image.complete else None

    def list_images(self, reference: str) -> api_pb2.ListImagesResponse | None:
        """Every image, or the one `reference` names; None: ask imaged."""
        if reference:
            image = self.find(reference)
            if image is None or not image.complete:
                return None
            return api_pb2.ListImagesResponse(images=[image.message()])
        if self._list is None:
            images = sorted(self.images.values(), key=lambda i: i.record.get("pulled_ns") or 0)
            if not all(i.complete for i in images):
                return None
            self._list = api_pb2.ListImagesResponse(images=[i.message() for i in images])
        return self._list
