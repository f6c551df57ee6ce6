"""Services of the EO inference platform: a small shared core plus one package per service.

Services depend on numpy and onnxruntime, never on torch (torch lives in ``models/`` only).
"""
