"""The Studio's templates: small functions that build ``twisted.web.template`` tags.

Python builders rather than XML template files: a page is mostly loops and conditionals over
model values, which read more plainly as code, and every string passed as a child or an
attribute is escaped by the flattener, so no value can become markup.
"""
