-- Orthanc -> aenode, each stable study in one association (fastest completion). Skips what
-- aenode itself sent back. Modality 'aenode' in DicomModalities; set StableAge low (1-5 s).
function OnStableStudy(studyId, tags, metadata)
  local ids = {}
  for _, i in pairs(ParseJson(RestApiGet('/studies/' .. studyId .. '/instances'))) do
    local ok, aet = pcall(RestApiGet, '/instances/' .. i['ID'] .. '/metadata/RemoteAET')
    if not ok or aet ~= 'AENODE' then
      table.insert(ids, i['ID'])
    end
  end
  if #ids > 0 then
    RestApiPost('/modalities/aenode/store', DumpJson(ids))
  end
end
