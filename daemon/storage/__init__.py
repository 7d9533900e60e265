"""What amberd keeps: the results database, GC roots, garbage collection, pins.

- ``db``: the SQLite database of builds, steps, images, pins, cache entries.
- ``schema``: its tables, and migrating a database an older amberd made.
- ``roots``: what keeps objects of the store alive (builds, images, pins, writers).
- ``gc``: collecting what no root keeps, and fsck; the automatic GC.
- ``pins``: named GC roots and pinning on success.
"""
