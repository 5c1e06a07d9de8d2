"""imaged's state feed and the frontend's image view: the view answers what imaged answers.

The feed's changes are caught as imaged publishes them; a view built from them
in order must equal one built from the feed's snapshot, and both must answer
ListImages and ImageStatus as imaged does, for every reference the view knows.
"""

from __future__ import annotations

from typing import Any

from cri_api.v1 import api_pb2

from services.frontend.image_convert import to_image
from services.frontend.image_view import ImageView
from shared.bus.feed import TOPIC
from tests.imaged.test_pull import pull_ready
from tests.support import images


class Capture:
    """Stands for imaged's event socket: keeps what is published."""

    def __init__(self) -> None:
        self.changes: list[dict[str, Any]] = []

    def publish(self, topic: str, message: dict[str, Any]) -> None:
        if topic == TOPIC and "key" in message:
            self.changes.append(message)


def views_from(imaged: Any, capture: Capture) -> tuple[ImageView, ImageView]:
    """A view made from the snapshot, and one made from every change published, in order."""
    from_snapshot, from_changes = ImageView(), ImageView()
    from_snapshot.reset(imaged.feed.snapshot("")["views"])
    assert [c["seq"] for c in capture.changes] == list(range(1, imaged.feed.seq + 1))
    for change in capture.changes:
        from_changes.apply(change["key"], change["view"])
    return from_snapshot, from_changes


async def assert_same_answers(imaged: Any, capture: Capture, references: list[str]) -> ImageView:
    from_snapshot, from_changes = views_from(imaged, capture)
    listed = api_pb2.ListImagesResponse(images=[to_image(r) for r in await imaged.list_images()])
    assert from_snapshot.list_images("") == from_changes.list_images("") == listed
    for reference in references:
        record = await imaged.image_status(reference=reference)
        answer = from_changes.image_status(reference)
        assert from_snapshot.image_status(reference) == answer
        if answer is not None:  # a reference the view knows: imaged's answer
            assert record is not None and answer == api_pb2.ImageStatusResponse(image=to_image(record))
    return from_changes


async def test_the_image_view_answers_what_imaged_answers(make_imaged, registry, catalog) -> None:
    imaged = await make_imaged(registry.host)
    capture = Capture()
    imaged.publisher = capture
    img = catalog.busybox
    await pull_ready(imaged, img.ref)
    await pull_ready(imaged, catalog.multi.ref)
    await pull_ready(imaged, img.digest_ref)
    references = [img.ref, img.digest_ref, img.config_digest, img.config_digest.removeprefix("sha256:"),
                  catalog.multi.ref, "test/busybox", img.config_digest[:19], f"{registry.host}/no/such:tag"]
    view = await assert_same_answers(imaged, capture, references)
    # What the view does not know by id or exact name is left to imaged.
    for unknown in ("test/busybox", img.config_digest[:19], f"{registry.host}/no/such:tag"):
        assert view.image_status(unknown) is None
    assert view.list_images(catalog.multi.ref).images[0].id == catalog.multi.config_digest

    await imaged.remove_image(reference=catalog.multi.ref)
    view = await assert_same_answers(imaged, capture, references)
    assert [i.id for i in view.list_images("").images] == [img.config_digest]


async def test_a_tag_that_moves_leaves_the_image_it_was_on(make_imaged, registry) -> None:
    imaged = await make_imaged(registry.host)
    capture = Capture()
    imaged.publisher = capture
    first = images.push_busybox_image(registry, "feed/moving", "v1", labels={"n": "1"})
    await pull_ready(imaged, first.ref)
    second = images.push_busybox_image(registry, "feed/moving", "v1", labels={"n": "2"})
    await pull_ready(imaged, second.ref)
    assert first.config_digest != second.config_digest
    view = await assert_same_answers(imaged, capture, [first.ref, first.config_digest, second.config_digest])
    assert view.image_status(first.ref).image.id == second.config_digest
    assert list(view.image_status(first.config_digest).image.repo_tags) == []
