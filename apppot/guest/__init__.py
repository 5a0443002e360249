"""What runs inside the VM: POSIX sh scripts, package data copied into images by `apppot build`.

A package only so that installers ship these files (setup.cfg package_data); host code reads them
with apppot.build.read_guest_file and never imports anything from here.
"""
