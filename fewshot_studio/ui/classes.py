"""Classes & examples: add, rename, describe and delete classes; upload images (files, drag and
drop, a zip of class folders, webcam); thumbnails with remove; counts."""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from ..errors import DataError, FewShotError
from ..app import insight as app_insight
from ..app import library
from ..app.library import POOL
from . import presenters
from .presenters import md
from .common import UI, added_text, consumed, friendly, need_project, picked, refused_text, toast_text, unchanged, who


def build(ui: UI) -> None:
    with gr.Row():
        with gr.Column(scale=2):
            ui.class_table = gr.Dataframe(headers=["class", "description", "images"], value=[],
                                          datatype=["str", "str", "number"], interactive=False,
                                          label="Classes (click one to open it)", elem_id="class-table",
                                          column_widths=["35%", "50%", "15%"])
            with gr.Group():
                ui.new_class = gr.Textbox(label="New class", placeholder="e.g. scratch", elem_id="new-class-name")
                ui.new_class_desc = gr.Textbox(label="Description (optional, used in the prompts)",
                                               placeholder="e.g. a thin bright line across the surface",
                                               elem_id="new-class-description")
                ui.add_class_btn = gr.Button("Add class", variant="primary", elem_id="add-class")
            gr.Markdown("A class may stay without images: zero-shot and MMA then classify it from its name "
                        "(and description).", elem_classes="fs-hint")
        with gr.Column(scale=3):
            ui.class_dd = gr.Dropdown(label="Class", choices=[], value=None, elem_id="class-select",
                                      info="The class whose images you see and add; or the unlabeled pool.")
            with gr.Row(elem_classes="fs-inline"):
                ui.rename_class_box = gr.Textbox(label="Name", scale=3, elem_id="rename-class-name")
                ui.rename_class_btn = gr.Button("Rename", scale=1, elem_id="rename-class")
                ui.delete_class_btn = gr.Button("Delete class", variant="stop", scale=1, elem_id="delete-class")
            with gr.Row(elem_classes="fs-inline"):
                ui.desc_box = gr.Textbox(label="Description", scale=4, elem_id="class-description")
                ui.save_desc_btn = gr.Button("Save description", scale=1, elem_id="save-description")
            # No `file_types` on upload components: Gradio refuses a WHOLE batch on the server if one
            # name does not match (a .txt-named JPEG, a .tga); the core judges each file by content
            # and refuses only the bad ones (imageio).
            with gr.Tabs():
                with gr.Tab("Upload images"):
                    ui.class_upload = gr.File(label="Drop images here (or click) — they join the class above",
                                              file_count="multiple", height=130,
                                              elem_id="class-upload")
                with gr.Tab("Zip of class folders"):
                    ui.zip_upload = gr.File(label="A zip of class_name/image folders: classes are created as "
                                                  "needed, loose files go to the pool",
                                            height=130, elem_id="zip-upload")
                with gr.Tab("Webcam"):
                    with gr.Row(elem_classes="fs-inline"):
                        ui.webcam = gr.Image(label="Snapshot", sources=["webcam"], type="filepath", height=240,
                                             elem_id="webcam")
                        ui.webcam_btn = gr.Button("Add snapshot to the class", scale=0, elem_id="add-webcam")
            # interactive: each thumbnail has a delete (✕) button, and images dropped on it join the class
            ui.class_gallery = gr.Gallery(label="Images (✕ on a thumbnail removes it; drop images here to add them)",
                                          columns=6, height=300, allow_preview=False, object_fit="contain",
                                          elem_id="class-gallery", interactive=True, sources=["upload"])
            # what the gallery shows, in order: a click's position maps to an image id here
            ui.class_ids = gr.State([])
            ui.upload_done = gr.State(None)  # the last upload's image ids and encoding job: its look-alike note
            with gr.Row(elem_classes="fs-inline"):
                ui.class_selected = gr.Textbox(label="Selected image", placeholder="click a thumbnail", scale=3,
                                               interactive=False, elem_id="class-selected-image")
                # the selected image's id: data set by the click, the one thing Remove reads
                ui.class_pick = gr.Number(value=None, precision=0, visible=False, label="Selected image id")
                ui.remove_btn = gr.Button("Remove selected image", variant="stop", scale=1, interactive=False,
                                          elem_id="remove-image")

    def no_pick() -> dict:  # (an update built at event time: a gr.Button made here would join the page)
        return {ui.class_selected: "", ui.class_pick: None,
                ui.remove_btn: gr.Button("Remove selected image", interactive=False)}

    def class_view(pid, owner, name=None):
        """{component: value} showing the project's classes with `name` (else the first) opened."""
        if pid is None:
            return {ui.class_table: [], ui.class_dd: gr.Dropdown(choices=[], value=None), ui.class_gallery: [],
                    ui.class_ids: [], ui.rename_class_box: "", ui.desc_box: "", **no_pick()}
        scope = ui.scope(pid, owner)
        choices = presenters.class_choices(scope) + [(POOL, POOL)]
        names = [v for _, v in choices]
        if name not in names:
            name = names[0]
        desc = "" if name == POOL else library.class_by_name(scope, name).description
        gallery, ids = presenters.gallery_items(scope, name)
        return {ui.class_table: library.class_rows(scope), ui.class_dd: gr.Dropdown(choices=choices, value=name),
                ui.class_gallery: gallery, ui.class_ids: ids,
                ui.rename_class_box: "" if name == POOL else name, ui.desc_box: desc, **no_pick()}

    outs = [ui.class_table, ui.class_dd, ui.class_gallery, ui.class_ids, ui.rename_class_box, ui.desc_box,
            ui.class_selected, ui.class_pick, ui.remove_btn]
    ui.add_view(lambda pid, owner: class_view(pid, owner), outs)
    ui.class_view = class_view
    ui.class_outputs = outs

    def on_tab(pid, name, owner, request: gr.Request):
        """Entering the tab: counts may have changed (accepted pool images, imports)."""
        return class_view(pid, who(owner, request), name) if pid is not None else unchanged(outs)

    ui.classes_tab_fn = on_tab
    acts = [ui.notice, *outs]

    @friendly
    def add_class(pid, name, desc, owner, request: gr.Request):
        owner = who(owner, request)
        c = library.add_class(ui.scope(pid, owner), name or "", desc or "")
        return {ui.notice: f"Added the class **{md(c.name)}**; now drop a few images into it.",
                **class_view(pid, owner, c.name), ui.new_class: "", ui.new_class_desc: ""}

    @friendly
    def open_class(pid, name, owner, request: gr.Request):
        return class_view(need_project(pid), who(owner, request), name)

    def table_select(pid, owner, evt: gr.SelectData, request: gr.Request):
        row = evt.row_value or []
        if pid is None or not row:
            return unchanged(outs)
        return class_view(pid, who(owner, request), row[0])

    def _real_class(name):
        if name in (None, "", POOL):
            raise DataError("Pick a class first (the Class menu).")
        return name

    @friendly
    def rename_class(pid, name, new_name, owner, request: gr.Request):
        owner = who(owner, request)
        scope = ui.scope(pid, owner)
        c = library.class_by_name(scope, _real_class(name))
        c2 = library.rename_class(scope, c.id, new_name or "")
        return {ui.notice: f"Renamed **{md(c.name)}** to **{md(c2.name)}**.", **class_view(pid, owner, c2.name)}

    @friendly
    def set_description(pid, name, desc, owner, request: gr.Request):
        owner = who(owner, request)
        scope = ui.scope(pid, owner)
        c = library.class_by_name(scope, _real_class(name))
        library.set_description(scope, c.id, desc or "")
        return {ui.notice: f"Saved the description of **{md(c.name)}**.", **class_view(pid, owner, c.name)}

    @friendly
    def delete_class(pid, name, owner, request: gr.Request):
        owner = who(owner, request)
        scope = ui.scope(pid, owner)
        c = library.class_by_name(scope, _real_class(name))
        moved = library.delete_class(scope, c.id)
        extra = f" Its {moved} image{'s' if moved != 1 else ''} moved to the unlabeled pool." if moved else ""
        return {ui.notice: f"Deleted the class **{md(c.name)}**.{extra}", **class_view(pid, owner)}

    def uploaded(up) -> dict | None:
        return {"ids": list(up.image_ids), "job": up.encode_job} if up.added else None

    def look_alike_note(pid, done, notice, owner, request: gr.Request):
        """After an upload: once its images are encoded (a background job; waited for a few
        seconds at most), say how many look like images the project already had."""
        if pid is None or not done:
            return gr.skip()
        try:
            n = app_insight.upload_look_alikes(ui.scope(pid, who(owner, request)), done["ids"], done.get("job"))
        except FewShotError:  # the project went meanwhile: the upload's own notice stands
            return gr.skip()
        if not n:
            return gr.skip()
        return f"{notice} {n} of these look like images you already have (Inspect tab: near-duplicates)."

    @friendly
    def add_images(pid, name, files, owner, request: gr.Request):
        owner = who(owner, request)
        with consumed(files) as paths:
            need_project(pid)
            if name in (None, ""):
                raise DataError("Pick a class first (the Class menu), then drop the images.")
            up = library.add_uploads(ui.scope(pid, owner), paths, name)
        where = "the unlabeled pool" if name == POOL else f"**{md(name)}**"
        if up.errors:
            gr.Warning(refused_text(up.errors, escape=toast_text).strip())
        return {ui.notice: added_text(up.added, up.duplicates, f"to {where}") + refused_text(up.errors),
                **class_view(pid, owner, name), ui.class_upload: None, ui.upload_done: uploaded(up)}

    @friendly
    def add_zip(pid, name, file, owner, request: gr.Request):
        owner = who(owner, request)
        with consumed(file) as paths:
            up = library.add_uploads(ui.scope(pid, owner), paths, None)
        if up.errors:
            gr.Warning(refused_text(up.errors, escape=toast_text).strip())
        return {ui.notice: added_text(up.added, up.duplicates, "from the zip") + refused_text(up.errors),
                **class_view(pid, owner, name), ui.zip_upload: None, ui.upload_done: uploaded(up)}

    @friendly
    def add_webcam(pid, name, image, owner, request: gr.Request):
        if image is None:
            raise DataError("Take a snapshot first (the camera button), then add it.")
        return add_images.__wrapped__(pid, name, [image], owner, request) | {ui.webcam: None}

    def gallery_select(pid, ids, owner, evt: gr.SelectData, request: gr.Request):
        image_id = picked(ids, evt)
        if pid is None or image_id is None:
            return no_pick()
        img = library.image(ui.scope(pid, who(owner, request)), image_id)
        return {ui.class_selected: img.original_name, ui.class_pick: img.id,
                ui.remove_btn: gr.Button(f"Remove {img.original_name[:40]}", interactive=True)}

    @friendly
    def gallery_delete(pid, name, owner, evt: gr.EventData, request: gr.Request):
        # the event carries the deleted item's file (gr.DeletedFileData expects another shape here)
        file = (getattr(evt, "_data", None) or {}).get("file") or {}
        thumb = file.get("orig_name") or file.get("path") or ""
        owner = who(owner, request)
        scope = ui.scope(pid, owner)
        img = presenters.image_by_thumbnail(scope, name, thumb)
        library.remove_images(scope, [img.id])
        return {ui.notice: f"Removed **{md(img.original_name)}**.", **class_view(pid, owner, name)}

    def gallery_upload(pid, name, value, owner, request: gr.Request):
        # the gallery's value: its thumbnails (files named by library.thumbnail_key) plus the
        # files just dropped on it
        shown = ({Path(t).stem for t, _ in presenters.image_gallery(ui.scope(pid, who(owner, request)), name)}
                 if pid and value else set())
        files = [item[0] for item in value or [] if Path(str(item[0])).stem not in shown]
        return add_images(pid, name, files, owner, request)

    @friendly
    def remove_image(pid, name, image_id, owner, request: gr.Request):
        owner = who(owner, request)
        if image_id in (None, ""):
            raise DataError("Select an image first (click its thumbnail).")
        scope = ui.scope(pid, owner)
        img = library.image(scope, int(image_id))
        library.remove_images(scope, [img.id])
        return {ui.notice: f"Removed **{md(img.original_name)}**.", **class_view(pid, owner, name)}

    ui.add_class_btn.click(add_class, [ui.project, ui.new_class, ui.new_class_desc, ui.owner],
                           acts + [ui.new_class, ui.new_class_desc], api_name="add_class")
    ui.new_class.submit(add_class, [ui.project, ui.new_class, ui.new_class_desc, ui.owner],
                        acts + [ui.new_class, ui.new_class_desc], api_visibility="private")
    ui.class_dd.input(open_class, [ui.project, ui.class_dd, ui.owner], outs, api_name="open_class")
    ui.class_table.select(table_select, [ui.project, ui.owner], outs, api_visibility="private")
    ui.rename_class_btn.click(rename_class, [ui.project, ui.class_dd, ui.rename_class_box, ui.owner], acts,
                              api_name="rename_class")
    ui.save_desc_btn.click(set_description, [ui.project, ui.class_dd, ui.desc_box, ui.owner], acts,
                           api_name="set_description")
    ui.delete_class_btn.click(delete_class, [ui.project, ui.class_dd, ui.owner], acts, api_name="delete_class")
    note_ins = [ui.project, ui.upload_done, ui.notice, ui.owner]
    ui.class_upload.upload(add_images, [ui.project, ui.class_dd, ui.class_upload, ui.owner],
                           acts + [ui.class_upload, ui.upload_done], api_name="add_images").then(
        look_alike_note, note_ins, [ui.notice], api_visibility="private", concurrency_limit=None)
    ui.zip_upload.upload(add_zip, [ui.project, ui.class_dd, ui.zip_upload, ui.owner],
                         acts + [ui.zip_upload, ui.upload_done], api_name="add_zip").then(
        look_alike_note, note_ins, [ui.notice], api_visibility="private", concurrency_limit=None)
    ui.webcam_btn.click(add_webcam, [ui.project, ui.class_dd, ui.webcam, ui.owner],
                        acts + [ui.class_upload, ui.webcam, ui.upload_done], api_name="add_webcam").then(
        look_alike_note, note_ins, [ui.notice], api_visibility="private", concurrency_limit=None)
    ui.class_gallery.select(gallery_select, [ui.project, ui.class_ids, ui.owner],
                            [ui.class_selected, ui.class_pick, ui.remove_btn], api_visibility="private")
    ui.class_gallery.delete(gallery_delete, [ui.project, ui.class_dd, ui.owner], acts, api_visibility="private")
    ui.class_gallery.upload(gallery_upload, [ui.project, ui.class_dd, ui.class_gallery, ui.owner],
                            acts + [ui.class_upload, ui.upload_done], api_visibility="private").then(
        look_alike_note, note_ins, [ui.notice], api_visibility="private", concurrency_limit=None)
    ui.remove_btn.click(remove_image, [ui.project, ui.class_dd, ui.class_pick, ui.owner], acts,
                        api_name="remove_image")
