"""The completion service: how replica roles and trainers tell the lighthouse role that they live and how they ended.

``state`` (who started, finished, was lost; the events), ``server`` (HTTP, token and body checks),
``client`` (what roles and trainers call). Each route's request and reply is a record of
:mod:`localsgd_ft.contract`; the API as a whole: docs/lifecycle.md, "The completion service".
"""
