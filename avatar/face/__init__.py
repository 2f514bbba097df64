"""Face tracking for ``avatar preprocess``: landmarks (MediaPipe FaceMesh -> iBUG-68), one stable crop
window per clip, head pose + camera + canonical landmarks, head/torso/background masks and the
background plate. Modules are imported on use (mediapipe is slow to import)::

    avatar.face.landmarks  FaceMeshTracker, FaceDetector, MP_TO_IBUG68, eye_aspect_ratio, fill_gaps
    avatar.face.crop       select_track, choose_crop, CropBox
    avatar.face.pose       mean_shape, fit_poses, smooth_poses, canonical_landmarks, rotation_noise
    avatar.face.masks      PersonSegmenter, label_frame, background_plate
"""
