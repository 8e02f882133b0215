"""Review before you publish: a local web app over a run's catalog (`dynface review`), the curator's
decisions written back as the `reviews` table, and `dynface publish`, which pastes back only the faces
a curator let through (see README, "Review and publish").

    queue.py      faces + photos from the catalog, review priority, filters, progress counts
    decisions.py  the append-only `reviews` table: record a decision, the one in force per face
    pixels.py     input crops recomputed from the source with the stored affine; FaceCrops for paste-back
    service.py    the app's state and actions, without HTTP
    web.py        FastAPI routes, server-rendered templates/ and static/ (plain JS for the keys)
    publish.py    final photos: accepted faces pasted, rejected faces keep the source pixels
"""
