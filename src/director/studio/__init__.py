"""The Studio: Director's web interface, server-rendered under ``/studio/`` by the daemon.

Pages are built with ``twisted.web.template`` (escaping every value), read playbooks, keys and
upstream state from the in-memory caches, and change things through the REST API's own route
functions (``forms.py`` turns a form into the API's JSON body), so the UI and ``/api/v1`` can
never disagree. Every core flow is a plain HTML form (POST, then redirect); ``static/studio.js``
only enhances (live status, copy buttons, confirmations, JSON help).
"""
