"""Running builds: from a spec to cached, frozen or finished steps.

- ``spec``: parsing and checking a build spec (steps, sources, stamp rules).
- ``keys``: cache keys of steps.
- ``bases``: resolving a spec's base (host, dir:, oci:, named images) to a tree.
- ``sources``: laying out a spec's sources into the initial tree.
- ``fetch``: downloading url sources, checked against their digests.
- ``stamps``: stamp rules: finding and removing inconsistent stamps and products.
- ``executor``: running one build's steps in sandboxes over its FUSE root.
- ``manager``: the queue of builds, job slots, cancelling, stopping.
- ``build``: the live ``Build`` object (status, events, followers).
- ``stepio``: a step's log file and output streams.
- ``frozen``: which state of a frozen build a shell or diff means.
- ``recovery``: cleaning up after a crashed amberd at start-up.
- ``sandbox_users``: the /etc/passwd and /etc/group a sandbox sees.
- ``buildid``: build ids and safe names.
"""
