-- Orthanc -> aenode, one association per instance (the course's set-up; worst case for
-- series completion). Skips what aenode itself sent back. Modality 'aenode' in DicomModalities.
function OnStoredInstance(instanceId, tags, metadata, origin)
  if origin['RemoteAet'] ~= 'AENODE' then
    SendToModality(instanceId, 'aenode')
  end
end
