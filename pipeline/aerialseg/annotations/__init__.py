"""Annotations: AnyLabeling / labelme JSON read and validated, rasterised to class masks, masks polygonised back."""
